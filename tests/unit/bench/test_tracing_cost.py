"""The tracing-cost bench's pure parts: the Telemetry it applies, the alternating order, the summary's sums,
medians and ratios, the table, the probe's count, and its flags."""

from __future__ import annotations

import pytest
import yaml

from bench.tracing_cost import (
    SAMPLINGS,
    Settings,
    parse_args,
    probe_completed,
    ratio,
    render,
    summarize,
    telemetry_yaml,
)
from mesh.api.validate import check_document


def test_the_telemetry_is_mesh_wide_and_valid() -> None:
    body = yaml.safe_load(telemetry_yaml(1.0))
    assert body["metadata"]["namespace"] == "istio-system" and "selector" not in body["spec"]
    assert body["spec"]["tracing"] == [{"randomSamplingPercentage": 1}]
    normalized, errors = check_document(body)
    assert errors == [] and normalized is not None


def test_rounds_alternate_which_sampling_goes_first() -> None:
    s = Settings()
    assert [s.order(n) for n in (1, 2, 3)] == [SAMPLINGS, tuple(reversed(SAMPLINGS)), SAMPLINGS]


def row(pct: float, completed: int, waypoint: float, agents: float, p50: int, spans: int, errors: int = 0) -> dict:
    return {"sampling": pct, "open": {"completed": completed, "error_count": errors,
                                      "latency_us": {"p50": p50, "p99": p50 * 3}},
            "closed": {"latency_us": {"p50": p50 // 2}, "error_count": 0},
            "cpu": {"waypoint": waypoint, "nodeagents": agents}, "waypoint_spans": spans}


def test_the_summary_sums_cpu_over_rounds_and_takes_median_latencies() -> None:
    rounds = [row(100.0, 1000, 1.2, 0.4, 900, 1000), row(1.0, 1000, 1.0, 0.4, 800, 10),
              row(1.0, 1000, 0.8, 0.2, 600, 11, errors=2), row(100.0, 1000, 1.2, 0.4, 1100, 1000)]
    out = summarize(rounds)
    hi, lo = out["samplings"]["100%"], out["samplings"]["1%"]
    assert hi["waypoint_cpu_per_1k"] == 1.2 and lo["waypoint_cpu_per_1k"] == 0.9
    assert hi["open_p50_us"] == 1000 and lo["open_p50_us"] == 700 and lo["closed_p50_us"] == 350
    assert hi["waypoint_spans_per_request"] == 1.0 and lo["waypoint_spans_per_request"] == 0.0105
    assert lo["errors"] == 2 and hi["requests"] == 2000
    assert out["ratios"]["waypoint_cpu_per_1k"] == 1.333 and out["ratios"]["agents_cpu_per_1k"] == 1.333
    table = render(out)
    assert "| ratio 100% / 1% | 1.33 | 1.33 | 1.43 |" in table and "| 100% | 1.2 |" in table


def test_missing_figures_give_no_ratio() -> None:
    assert ratio(1.0, 0) is None and ratio(None, 1.0) is None and ratio(3.0, 2.0) == 1.5
    out = summarize([row(100.0, 0, 0.0, 0.0, 1, 0)])
    assert out["samplings"]["1%"]["requests"] == 0 and out["ratios"]["waypoint_cpu_per_1k"] is None
    assert "| 1% | - | - |" in render(out)


def test_the_probes_count_comes_from_the_generators_json_line() -> None:
    assert probe_completed('starting\n{"sent": 200, "completed": 198}\n') == 198
    assert probe_completed("Traceback ...\nOSError: no route") == 0
    assert probe_completed('{"completed": "x"}') == 0


def test_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]) == Settings()
    quick = parse_args(["--quick", "--rate", "50", "--cluster-name", "x"])
    assert (quick.rounds, quick.duration, quick.rate, quick.cluster_name) == (1, 3.0, 50.0, "x")
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    assert "must be above 0" in capsys.readouterr().err
