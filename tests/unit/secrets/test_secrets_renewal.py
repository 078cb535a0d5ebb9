"""The renewal schedule, without sockets or clocks."""

from __future__ import annotations

import random

import pytest

from mesh.secrets.renewal import RenewalPolicy, RenewalSchedule, RenewalState


def test_renew_at_half_life() -> None:
    assert RenewalPolicy().renew_at(1000.0, 1000.0 + 86400) == 1000.0 + 43200


def test_backoff_doubles_and_caps_at_150s_without_jitter() -> None:
    policy = RenewalPolicy(jitter=0.0)
    delays = [policy.backoff(n, random.Random(1)) for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150, 150]


def test_backoff_jitter_stays_in_bounds_and_under_the_cap() -> None:
    policy = RenewalPolicy()
    rng = random.Random(7)
    for n in range(1, 40):
        base = min(2.0 ** (n - 1), 1e9)
        d = policy.backoff(n, rng)
        assert d <= 150.0
        assert min(base * 0.8, 150.0) <= d <= min(base * 1.2, 150.0)
    samples = {round(policy.backoff(3, rng), 6) for _ in range(20)}
    assert len(samples) > 1  # actually jittered


def test_backoff_is_for_retries_only() -> None:
    with pytest.raises(ValueError):
        RenewalPolicy().backoff(0, random.Random())


@pytest.mark.parametrize(
    "kwargs",
    [{"renew_fraction": 0}, {"renew_fraction": 1}, {"initial_backoff": 0}, {"multiplier": 0.5},
     {"max_backoff": 0.1}, {"jitter": 1.0}],
)
def test_bad_policies(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(**kwargs)


def test_schedule_state_machine() -> None:
    s = RenewalSchedule(RenewalPolicy(jitter=0.0), random.Random(0))
    assert s.state is RenewalState.NEEDED and s.delay(0.0) == 0.0
    assert s.issued(100.0, 200.0) == 150.0
    assert s.state is RenewalState.VALID and s.delay(120.0) == 30.0
    assert s.failed(150.0) == 151.0
    assert s.failed(151.0) == 153.0
    assert s.state is RenewalState.RETRYING and s.failures == 2
    assert not s.expired(199.0) and s.expired(200.0)
    s.issued(160.0, 260.0)
    assert s.state is RenewalState.VALID and s.failures == 0 and s.due == 210.0
