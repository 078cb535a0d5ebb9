"""Load balancing, outlier detection, pool limits and retry classification (no sockets)."""

from __future__ import annotations

import random
from collections import Counter

from waypoint.l7.lb import Balancer
from waypoint.l7.limits import Admission, ClusterLimiter
from waypoint.l7.model import Endpoint
from waypoint.l7.outlier import OutlierDetector
from waypoint.l7.retry import Outcome, retriable
from waypoint.l7.rules import OutlierPolicy, PoolLimits

EPS = [Endpoint(f"10.0.0.{i}", 80) for i in range(1, 5)]


def test_round_robin_cycles_and_skips_unavailable() -> None:
    b = Balancer(random.Random(1))
    assert [b.pick("ROUND_ROBIN", EPS).address for _ in range(4)] == [e.address for e in EPS]  # type: ignore[union-attr]
    picks = {b.pick("ROUND_ROBIN", EPS, lambda e: e.address != "10.0.0.2").address for _ in range(8)}  # type: ignore[union-attr]
    assert "10.0.0.2" not in picks and len(picks) == 3
    assert b.pick("ROUND_ROBIN", EPS, lambda e: False) is None


def test_random_spreads_and_least_request_prefers_idle() -> None:
    b = Balancer(random.Random(2))
    counts = Counter(b.pick("RANDOM", EPS).address for _ in range(4000))  # type: ignore[union-attr]
    assert all(800 < c < 1200 for c in counts.values())
    busy, idle = EPS[0], EPS[1]
    for _ in range(5):
        b.started(busy)
    assert all(b.pick("LEAST_REQUEST", [busy, idle]) == idle for _ in range(20))
    for _ in range(5):
        b.finished(busy)
    assert b.active == {}


def test_exclude_prefers_endpoints_not_tried_yet() -> None:
    b = Balancer(random.Random(3))
    assert b.pick("RANDOM", EPS[:2], exclude=frozenset({EPS[0].key})) == EPS[1]
    assert b.pick("RANDOM", EPS[:1], exclude=frozenset({EPS[0].key})) == EPS[0]


def test_outlier_ejects_after_consecutive_5xx_and_returns_after_base_times_n() -> None:
    o = OutlierDetector(OutlierPolicy(consecutive_5xx=3, interval=1.0, base_ejection_time=30.0, max_ejection_percent=100))
    k = EPS[0].key
    assert not o.record(k, 500, 0.0, 4)
    assert not o.record(k, 200, 0.1, 4)  # a success resets the count
    assert not o.record(k, 500, 0.2, 4) and not o.record(k, 503, 0.3, 4)
    assert o.record(k, 502, 0.4, 4)
    assert o.is_ejected(k, 10.0) and not o.is_ejected(k, 30.5)
    for t in (31.0, 31.1, 31.2):  # ejected again at once: twice as long now
        o.record(k, 500, t, 4)
    assert o.is_ejected(k, 31.2 + 59.0) and not o.is_ejected(k, 31.2 + 60.1)


def test_max_ejection_percent_is_respected_but_one_may_always_go() -> None:
    o = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=10))
    ejected = [o.record(e.key, 500, 0.0, len(EPS)) for e in EPS]
    assert ejected == [True, False, False, False]
    o = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=50))
    assert [o.record(e.key, 500, 0.0, len(EPS)) for e in EPS] == [True, True, False, False]


def test_limiter_queue_and_overflow() -> None:
    async def main() -> None:
        lim = ClusterLimiter(PoolLimits(max_connections=1, max_pending=1))
        assert await lim.acquire()
        assert lim.admit() is Admission.QUEUE
        got: list[bool] = []
        async with trio.open_nursery() as n:
            async def waiter() -> None:
                got.append(await lim.acquire())
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert lim.pending == 1 and lim.admit() is Admission.OVERFLOW
            assert not await lim.acquire()
            lim.release()
        assert got == [True] and lim.active == 1
        lim.release()
        assert lim.active == 0
        lim2 = ClusterLimiter(PoolLimits(max_retries=1))
        assert lim2.try_retry() and not lim2.try_retry()
        lim2.retry_done()
        assert lim2.try_retry()

    import trio.testing  # noqa: F401
    trio.run(main)


def test_retry_on_words() -> None:
    assert retriable(Outcome(503), frozenset({"5xx"}))
    assert retriable(Outcome(502), frozenset({"gateway-error"}))
    assert not retriable(Outcome(500), frozenset({"gateway-error"}))
    assert retriable(Outcome(failure="connect-failure"), frozenset({"connect-failure"}))
    assert retriable(Outcome(failure="reset"), frozenset({"5xx"}))
    assert not retriable(Outcome(failure="reset"), frozenset({"connect-failure"}))
    assert retriable(Outcome(409), frozenset({"retriable-4xx"}))
    assert retriable(Outcome(503), frozenset({"503"}))
    assert not retriable(Outcome(200), frozenset({"5xx", "gateway-error"}))
