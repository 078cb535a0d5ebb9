"""Report rendering from synthetic raw figures: aggregation over rounds, added latency, cost, chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import report
from bench.histogram import Histogram


def _open_phase(latencies: list[int], cpu: dict[str, float]) -> dict[str, Any]:
    h = Histogram()
    h.record_many(latencies)
    lag = Histogram()
    lag.record_many([5] * len(latencies))
    return {"sent": len(latencies), "completed": len(latencies), "errors": {}, "error_count": 0,
            "achieved_rps": 1000.0, "client_cpu_seconds": 0.2, "mesh_cpu_seconds": cpu,
            "histograms": {"latency": h.to_json(), "service": h.to_json(), "lag": lag.to_json()}}


def _round(n: int, mode: str, base: int, cpu: dict[str, float], rss: dict[str, int], errors: int = 0) -> dict[str, Any]:
    closed = _open_phase([base // 2] * 100, cpu)
    phases = {"open": _open_phase([base] * 900 + [base * 10] * 100, cpu), "closed": closed,
              "saturation": {"requests_per_s": 1000.0 * n + 20000 - base, "error_count": errors,
                             "errors": {"non-2xx": errors} if errors else {}},
              "stream": {"mb_per_s": 2000.0 - base, "error_count": 0}}
    if mode == "a":
        phases["crosscheck"] = {"latency_us": {"p50": 30.0, "p99": 90.0}, "error_count": 0}
    return {"round": n, "mode": mode, "phases": phases, "errors": [], "error_count": errors,
            "peak_rss_kib": rss}


def results(with_errors: bool = False) -> dict[str, Any]:
    rounds = []
    for n in (1, 2):
        rounds.append(_round(n, "a", 30, {}, {}))
        rounds.append(_round(n, "b", 300, {"nodeagent node-1": 0.2, "nodeagent node-2": 0.2},
                             {"nodeagent node-1": 50_000 + n, "nodeagent node-2": 40_000}))
        rounds.append(_round(n, "d", 400, {"envoy client": 0.3, "envoy server": 0.3},
                             {"envoy client": 70_000, "envoy server": 71_000}, errors=3 if with_errors else 0))
    return {
        "meta": {"started": "2026-01-02T03:04:05+00:00", "host": "box", "kernel": "6.1", "cpus": 2, "python": "3.11",
                 "envoy": "1.40", "client_pinned_cpu": 1,
                 "settings": {"rounds": 2, "duration": 30.0, "rate": 1000.0, "connections": 16}},
        "modes": {"a": {"title": "no mesh", "status": "ok"}, "b": {"title": "mesh L4", "status": "ok"},
                  "c": {"title": "mesh L7", "status": "unavailable: no waypoint"},
                  "d": {"title": "sidecars", "status": "errors" if with_errors else "ok"}},
        "rounds": rounds,
    }


def test_summary_merges_rounds_and_computes_cost() -> None:
    s = report.summarize(results())
    assert s["a"]["open"] == {"p50": 30, "p90": 30, "p99": 300}
    assert s["b"]["open"]["p50"] == 300 and s["b"]["open"]["p99"] == 3000
    # 0.4 s of agent CPU for 1,000 requests per round, two rounds
    assert abs(s["b"]["cpu_per_1k"]["total"] - 0.4) < 1e-9
    assert abs(s["b"]["cpu_per_1k"]["nodeagent node-1"] - 0.2) < 1e-9
    assert s["b"]["peak_rss_kib"]["nodeagent node-1"] == 50_002
    assert s["d"]["saturation_rps"] == 21_100.0
    assert s["c"]["rounds"] == 0 and "open" not in s["c"]


def test_markdown_shows_added_latency_status_and_accuracy() -> None:
    md = report.markdown(results())
    assert "| b: mesh L4 | ok | 300 µs | 300 µs | 3000 µs | +270 µs | +270 µs | +2700 µs |" in md
    assert "unavailable: no waypoint" in md and "unavailable (see below)" in md
    assert "| b: mesh L4 | 0.400 | nodeagent node-1 0.200, nodeagent node-2 0.200 |" in md
    assert "asked 1000 req/s" in md and "wrk on the same path p50 30 µs" in md


def test_a_mode_with_errors_is_marked() -> None:
    md = report.markdown(results(with_errors=True))
    row = next(line for line in md.splitlines() if line.startswith("| d: sidecars |") and "µs" in line)
    assert "**ERRORS**" in row and row.rstrip().endswith("| 6 |")
    assert "saturation: non-2xx" in md


def test_write_all_produces_json_markdown_and_png(tmp_path: Path) -> None:
    paths = report.write_all(results(), tmp_path)
    assert paths["json"].name == "2026-01-02T030405-box.json"
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["a"]["open"]["p50"] == 30 and len(data["rounds"]) == 6
    assert paths["md"].read_text().startswith("# Mesh benchmark, 2026-01-02 on box")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_baseline_says_so() -> None:
    r = results()
    r["rounds"] = [x for x in r["rounds"] if x["mode"] != "a"]
    assert "accuracy cannot be shown" in report.markdown(r)


def _with_new_phases() -> dict[str, Any]:
    """`results()` plus mode f, new-connection phases, first connections and b's scale phase."""
    r = results()
    r["modes"]["f"] = {"title": "L4 floor", "status": "ok"}
    for n in (1, 2):
        r["rounds"].append(_round(n, "f", 200, {"envoy client": 0.08, "envoy server": 0.08}, {}))
    per_conn = {"a": ({}, 300), "b": ({"nodeagent node-1": 1.0, "nodeagent node-2": 1.0}, 2000),
                "d": ({"envoy client": 0.5, "envoy server": 0.5}, 4000), "f": ({"envoy client": 1.0}, 3000)}
    for rnd in r["rounds"]:
        cpu, lat = per_conn[rnd["mode"]]
        rnd["phases"]["newconn200"] = _open_phase([lat] * 1000, cpu)
        rnd["first_connection"] = {"latency_us": lat * 2, "errors": {}}
        if rnd["mode"] == "b":
            rnd["rss_fresh_kib"] = {"nodeagent node-1": 40_000 + 1024 * rnd["round"], "nodeagent node-2": 45_000}
            rnd["phases"]["scale"] = {
                "tunnels": 1000, "rate": 1000.0, "opened": 1000, "opened_per_s": 400.0, "completed": 1000,
                "error_count": 0,
                "rss_idle_kib": {"nodeagent node-1": 70_000, "nodeagent node-2": 60_000},
                "rss_held_kib": {"nodeagent node-1": 80_000, "nodeagent node-2": 68_000},
                "kib_per_tunnel": {"nodeagent node-1": 10.0, "nodeagent node-2": 8.0},
                "mesh_cpu_seconds": {"nodeagent node-1": 1.5, "nodeagent node-2": 1.0}}
    return r


def test_new_connection_scale_and_goal_figures() -> None:
    s = report.summarize(_with_new_phases())
    assert s["b"]["newconn"]["newconn200"]["p50"] == 2000
    assert abs(s["b"]["newconn"]["newconn200"]["cpu_per_1k"] - 2.0) < 1e-9  # 2 s per 1,000 connections
    assert s["b"]["first_connection_us"] == 4000
    sc = s["b"]["scale"]
    assert sc["tunnels"] == 1000 and sc["kib_per_tunnel"] == 18.0 and abs(sc["cpu_per_1k"] - 2.5) < 1e-9
    assert sc["rss_held_kib"] == {"nodeagent node-1": 80_000, "nodeagent node-2": 68_000}
    assert s["d"]["scale"] == {}


def test_markdown_shows_the_ratios_new_connections_and_scale() -> None:
    md = report.markdown(_with_new_phases())
    # CPU: b 0.4 against d 0.6 and f 0.16; added p50: b +270 against d +370
    assert "| b: mesh L4 | 0.67x | 2.50x | 0.73x |" in md
    assert "| b: mesh L4 | 200 | 2000 µs | 2000 µs | +1700 µs | +1700 µs | 0.50x | 0.50x | 2.000 | 2.00x | 4000 µs |" in md
    assert f"at most {report.SCALE_BOUND_KIB:g} KiB" in md
    row = next(line for line in md.splitlines() if line.startswith("| b: mesh L4 | 1,000"))
    assert "| 18.0 |" in row and "| 2.500 |" in row and "(opened at 400/s)" in row
    assert ("| yes |" in row) is (report.SCALE_BOUND_KIB >= 18.0)
    # fresh (before any load: the largest over rounds) beside idle after the load phases and held
    assert "| nodeagent node-1 41 MiB, nodeagent node-2 44 MiB | nodeagent node-1 68 MiB, nodeagent node-2 59 MiB |" in row
    cost = next(line for line in md.splitlines() if line.startswith("| b: mesh L4 | 0.400 |"))
    assert "| nodeagent node-1 41 MiB, nodeagent node-2 44 MiB | nodeagent node-1 49 MiB" in cost
    assert "| d: sidecars | 0.600 | envoy client 0.300, envoy server 0.300 | - |" in md


def test_no_new_phases_no_new_sections() -> None:
    md = report.markdown(results())
    assert "New connections" not in md and "Scale" not in md and "L4 floor (f)" in md
