"""bench.capture_bench: each variant differs from today's rules by its lever only, and bad names fail
before anything is made; one small run for real where namespaces can be made."""

from __future__ import annotations

import os

import pytest

from bench import capture_bench
from nodeagent.redirect.rules import install_script
from tests.unit.nodeagent.test_redirect_rules import PREVIOUS_VERSION


def test_ours_is_what_the_agent_installs() -> None:
    assert capture_bench.variant_script("ours") == install_script()


def test_istio_is_the_previous_versions_rule_set() -> None:
    istio = capture_bench.variant_script("istio")
    assert sorted(istio.splitlines()) == sorted(PREVIOUS_VERSION.splitlines())


def test_the_dropped_levers_differ_from_ours_by_their_lever_only() -> None:
    ours = set(install_script().splitlines())
    notrack = set(capture_bench.variant_script("notrack").splitlines())
    assert ours < notrack and all("raw" in line or "--notrack" in line or line.startswith((":", "-A", "COMMIT"))
                                  for line in notrack - ours)
    outmark = capture_bench.variant_script("outmark")
    assert "-A PREROUTING -j AMB_PRERT" in outmark  # nat's
    assert outmark.count("-A PREROUTING -j AMB_PRERT") == 1 and "-o lo -m mark --mark 0x539/0xfff" in outmark


def test_an_unknown_variant_is_refused_before_anything_is_made() -> None:
    with pytest.raises(SystemExit) as refused:
        capture_bench.main(["--variants", "ours,bogus", "--rounds", "1"])
    assert "unknown variant 'bogus'" in str(refused.value.code)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"capbench-{os.getpid()}-")] \
        if os.path.isdir("/run/netns") else True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
def test_a_small_run_carries_every_hop(capsys: pytest.CaptureFixture[str]) -> None:
    assert capture_bench.main(["--requests", "50", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in capture_bench.VARIANTS)
