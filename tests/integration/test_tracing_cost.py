"""`python -m bench.tracing_cost` end to end, tiny: mode c at 100% and at 1% sampling on a real cluster of its
own, the spans really exported (one per request at 100%, few at 1%), the ratios computed, nothing left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Meshctl, leftovers

pytestmark = pytest.mark.root
NAME = "t-trace-cost"


def test_the_tracing_cost_bench_measures_both_samplings(meshctl: Meshctl, tmp_path: Path) -> None:
    output = tmp_path / "cost.json"
    try:
        out = subprocess.run([sys.executable, "-m", "bench.tracing_cost", "--quick", "--duration", "2", "--rate", "100",
                              "--cluster-name", NAME, "--output", str(output)], capture_output=True, text=True,
                             env=meshctl.env(), cwd=ROOT, timeout=240, check=False)
        assert out.returncode == 0, f"exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    finally:
        meshctl("cluster", "down", NAME, check=False)
    assert leftovers(NAME) == []
    summary = json.loads(output.read_text())["summary"]
    full, low = summary["samplings"]["100%"], summary["samplings"]["1%"]
    assert full["requests"] >= 150 and low["requests"] >= 150 and full["errors"] == low["errors"] == 0
    assert full["waypoint_spans_per_request"] == 1.0  # every request traced at 100%...
    assert low["waypoint_spans_per_request"] < 0.2  # ... about one in a hundred at 1%
    assert all(summary["ratios"][k] is not None for k in ("waypoint_cpu_per_1k", "open_p50_us", "closed_p50_us"))
    assert "| ratio 100% / 1% |" in out.stdout
