"""Turn a run's raw figures into what people read: the JSON file, a Markdown table and a PNG chart.

Aggregation over rounds (all pure, tested without a cluster):
- latency percentiles of a mode: its rounds' histograms merged (every request of every round counts once);
- added latency: the mode's percentile minus no mesh's, from the same run;
- CPU per 1,000 requests: the mesh processes' CPU seconds during the fixed-rate phase, summed over
  rounds, divided by the requests completed in those phases, times 1,000;
- peak RSS: the largest VmHWM any round saw, per process; fresh RSS: the largest VmRSS any round saw with
  the mode's capture in place and before any load (the harness's `fresh_rss`), per process;
- saturation requests/s and stream MB/s: the median over rounds.
A mode whose rounds had errors is marked in the table; an unavailable mode shows its reason.
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.histogram import Histogram

CHART_PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
BASELINE = "a"
SIDECARS = "d"  # the goals are ratios to the sidecar pair ...
FLOOR = "f"  # ... and to the L4 floor (Envoy tcp_proxy with mTLS)
NODE_AGENT_MODES = ("b", "e")
SCALE_BOUND_KIB = 24.0  # the stated bound: both node agents' memory per idle tunnel, KiB (12 each)


def merged_latency(results: dict[str, Any], mode: str, phase: str = "open", which: str = "latency") -> Histogram:
    h = Histogram()
    for r in results["rounds"]:
        ph = r["mode"] == mode and r["phases"].get(phase)
        if ph and "histograms" in ph:
            h.merge(Histogram.from_json(ph["histograms"][which]))
    return h


def _rounds(results: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in results["rounds"] if r["mode"] == mode]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cpu_per_1k(results: dict[str, Any], mode: str, phase: str = "open") -> dict[str, float]:
    """Mesh CPU seconds per 1,000 completed requests in `phase`, per process role and in total."""
    cpu: dict[str, float] = {}
    completed = 0
    for r in _rounds(results, mode):
        ph = r["phases"].get(phase)
        if not ph or "completed" not in ph:
            continue
        completed += ph["completed"]
        for role, sec in ph.get("mesh_cpu_seconds", {}).items():
            cpu[role] = cpu.get(role, 0.0) + sec
    if not completed:
        return {}
    out = {role: sec / completed * 1000 for role, sec in sorted(cpu.items())}
    out["total"] = sum(cpu.values()) / completed * 1000
    return out


def peak_rss(results: dict[str, Any], mode: str, figure: str = "peak_rss_kib") -> dict[str, int]:
    """Per process, the largest of a round's memory `figure` ("peak_rss_kib", "rss_fresh_kib") over the rounds."""
    out: dict[str, int] = {}
    for r in _rounds(results, mode):
        for role, kib in (r.get(figure) or {}).items():
            out[role] = max(out.get(role, 0), kib)
    return out


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per mode: status, latency percentiles (open and closed loop), saturation, stream, cost, errors."""
    out: dict[str, dict[str, Any]] = {}
    for key, info in results["modes"].items():
        rounds = _rounds(results, key)
        row: dict[str, Any] = {"title": info["title"], "status": info["status"], "rounds": len(rounds)}
        openh = merged_latency(results, key, "open")
        closedh = merged_latency(results, key, "closed")
        if openh.total:
            row["open"] = {f"p{p:g}": openh.percentile(p) for p in (50, 90, 99)}
            row["open_p99_by_round"] = [r["phases"]["open"]["latency_us"]["p99"] for r in rounds
                                        if r["phases"].get("open", {}).get("latency_us", {}).get("p99") is not None]
            row["send_lag_p99"] = merged_latency(results, key, "open", "lag").percentile(99)
        if closedh.total:
            row["closed"] = {f"p{p:g}": closedh.percentile(p) for p in (50, 90, 99)}
        row["saturation_rps"] = _median([r["phases"]["saturation"]["requests_per_s"] for r in rounds
                                         if "requests_per_s" in r["phases"].get("saturation", {})])
        row["stream_mb_s"] = _median([r["phases"]["stream"]["mb_per_s"] for r in rounds
                                      if "mb_per_s" in r["phases"].get("stream", {})])
        row["cpu_per_1k"] = cpu_per_1k(results, key)
        row["newconn"] = newconn_rows(results, key)
        firsts = [r["first_connection"]["latency_us"] for r in rounds
                  if (r.get("first_connection") or {}).get("latency_us") is not None]
        row["first_connection_us"] = _median(firsts)
        row["scale"] = scale_row(results, key)
        row["peak_rss_kib"] = peak_rss(results, key)
        row["rss_fresh_kib"] = peak_rss(results, key, "rss_fresh_kib")
        row["error_count"] = sum(r["error_count"] for r in rounds)
        row["errors"] = sorted({e for r in rounds for e in r.get("errors", [])} |
                               {f"{ph}: {k}" for r in rounds for ph, v in r["phases"].items()
                                for k in (v.get("errors") or {})})
        out[key] = row
    return out


def newconn_phases(results: dict[str, Any]) -> list[str]:
    """The new-connection phases of the run, by rate."""
    found = {ph for r in results["rounds"] for ph in r["phases"] if ph.startswith("newconn")}
    return sorted(found, key=lambda ph: float(ph[len("newconn"):]))


def newconn_rows(results: dict[str, Any], mode: str) -> dict[str, dict[str, float]]:
    """Per new-connection phase: latency p50 / p99 (rounds merged) and mesh CPU s per 1,000 connections."""
    out: dict[str, dict[str, float]] = {}
    for phase in newconn_phases(results):
        h = merged_latency(results, mode, phase)
        if not h.total:
            continue
        row = {"p50": float(h.percentile(50)), "p99": float(h.percentile(99))}
        cpu = cpu_per_1k(results, mode, phase)
        if "total" in cpu:
            row["cpu_per_1k"] = cpu["total"]
        out[phase] = row
    return out


def scale_row(results: dict[str, Any], mode: str) -> dict[str, Any]:
    """The scale phase: tunnels held, memory idle and held (largest over rounds), KiB per tunnel summed over
    the processes (median over rounds), CPU s per 1,000 connections opened (over all rounds)."""
    phases = [r["phases"]["scale"] for r in _rounds(results, mode) if r["phases"].get("scale", {}).get("opened")]
    if not phases:
        return {}
    idle: dict[str, int] = {}
    held: dict[str, int] = {}
    for ph in phases:
        for role, kib in ph["rss_idle_kib"].items():
            idle[role] = max(idle.get(role, 0), kib)
        for role, kib in ph["rss_held_kib"].items():
            held[role] = max(held.get(role, 0), kib)
    cpu = sum(sum(ph["mesh_cpu_seconds"].values()) for ph in phases)
    opened = sum(ph["opened"] for ph in phases)
    return {"tunnels": max(ph["opened"] for ph in phases), "rss_idle_kib": idle, "rss_held_kib": held,
            "kib_per_tunnel": statistics.median(sum(ph["kib_per_tunnel"].values()) for ph in phases),
            "cpu_per_1k": cpu / opened * 1000,
            "opened_per_s": statistics.median(ph.get("opened_per_s", 0.0) for ph in phases)}


def _ratio(v: float | None, ref: float | None) -> str:
    if v is None or ref is None or ref <= 0:
        return "-"
    return f"{v / ref:.2f}x"


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f} ms" if abs(v) >= 10000 else f"{v:.0f} µs"


def _added(v: float | None, base: float | None) -> str:
    if v is None or base is None:
        return "-"
    d = v - base
    return f"+{_us(d)}" if d >= 0 else f"−{_us(-d)}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    s = meta["settings"]
    rows = summarize(results)
    base = rows.get(BASELINE, {})
    bo, bc = base.get("open", {}), base.get("closed", {})
    lines = [
        f"# Mesh benchmark, {meta['started'][:10]} on {meta['host']}",
        "",
        f"{meta['cpus']} CPUs, kernel {meta['kernel']}, Python {meta['python']}, Envoy {meta['envoy']}. "
        f"{s['rounds']} round(s), modes alternated; {s['duration']:g} s per load phase; fixed rate "
        f"{s['rate']:g} req/s over {s['connections']} connections (open loop, latency from the scheduled send "
        f"time); HTTP/1.1, 1 KiB responses; client pinned to CPU {meta['client_pinned_cpu']}.",
        "",
        "## Latency added over no mesh (fixed rate, open loop)",
        "",
        "| mode | status | p50 | p90 | p99 | added p50 | added p90 | added p99 | 1-conn p50 (added) | "
        "p99 by round | generator lag p99 | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in rows.items():
        o, c = r.get("open", {}), r.get("closed", {})
        closed = f"{_us(c.get('p50'))} ({_added(c.get('p50'), bc.get('p50'))})" if c else "-"
        if key == BASELINE and c:
            closed = _us(c.get("p50"))
        added = ["-"] * 3 if key == BASELINE else [_added(o.get(p), bo.get(p)) for p in ("p50", "p90", "p99")]
        lines.append(f"| {key}: {r['title']} | {_status(r)} | {_us(o.get('p50'))} | {_us(o.get('p90'))} | "
                     f"{_us(o.get('p99'))} | {' | '.join(added)} | {closed} | "
                     f"{' / '.join(_us(v) for v in r.get('open_p99_by_round', [])) or '-'} | "
                     f"{_us(r.get('send_lag_p99'))} | {r['error_count']} |")
    lines += [
        "",
        "*generator lag p99*: how late the generator itself wrote the 99th percentile request (its own",
        "scheduling, or the machine taking its CPU). Where it is near the p99, the p99 is the machine's noise,",
        "not the path's; compare the rounds, and rerun with more rounds on a quieter machine.",
        "",
        "## Cost and capacity",
        "",
        "| mode | mesh CPU s / 1,000 req | per process | RSS fresh per process (before any load) | "
        "peak RSS per process | saturation req/s (64 conn) | stream MB/s (1 conn) |",
        "| --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for key, r in rows.items():
        cpu = r["cpu_per_1k"]
        per = ", ".join(f"{role} {v:.3f}" for role, v in cpu.items() if role != "total") or "-"
        rss = _mib(r["peak_rss_kib"])
        fresh = _mib(r["rss_fresh_kib"])
        total = f"{cpu['total']:.3f}" if "total" in cpu else ("0" if key == BASELINE and r.get("open") else "-")
        sat = f"{r['saturation_rps']:,.0f}" if r["saturation_rps"] is not None else "-"
        stream = f"{r['stream_mb_s']:,.0f}" if r["stream_mb_s"] is not None else "-"
        lines.append(f"| {key}: {r['title']} | {total} | {per} | {fresh} | {rss} | {sat} | {stream} |")
    lines += goal_lines(rows)
    lines += newconn_lines(results, rows)
    lines += scale_lines(rows)
    lines += ["", "## The generators' accuracy (no mesh, this run)", ""]
    lines += accuracy_lines(results)
    problems = [(k, r) for k, r in rows.items() if r["errors"] or r["status"].startswith("unavailable")]
    if problems:
        lines += ["", "## Errors and unavailable modes", ""]
        for key, r in problems:
            if r["status"].startswith("unavailable"):
                lines.append(f"- {key} ({r['title']}): {r['status']}")
            for e in r["errors"]:
                lines.append(f"- {key} ({r['title']}): {e}")
    lines.append("")
    return "\n".join(lines)


def goal_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The node agents against the sidecar pair (d) and the L4 floor (f), as the issue states its goals."""
    d, f = rows.get(SIDECARS), rows.get(FLOOR)
    agents = [k for k in NODE_AGENT_MODES if k in rows and rows[k].get("open")]
    if d is None or not agents:
        return []
    base = rows.get(BASELINE, {}).get("open", {})

    def added(r: dict[str, Any], p: str) -> float | None:
        v, b = r.get("open", {}).get(p), base.get(p)
        return None if v is None or b is None else v - b

    lines = ["", "## The node agents against the sidecar pair (d) and the L4 floor (f)", "",
             "Ratios within this run (goals: CPU <= 0.5x d and <= 1.25x f; added p50 and p90 <= 1.0x d; "
             "saturation and stream >= 1.0x d).", "",
             "| mode | CPU / 1,000 req vs d | vs f | added p50 vs d | added p90 vs d | saturation vs d | "
             "stream vs d |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key in [*agents, FLOOR]:
        r = rows.get(key)
        if r is None or not r.get("open"):
            continue
        cpu = r["cpu_per_1k"].get("total")
        lines.append(f"| {key}: {r['title']} | {_ratio(cpu, d['cpu_per_1k'].get('total'))} | "
                     f"{_ratio(cpu, f['cpu_per_1k'].get('total')) if f else '-'} | "
                     f"{_ratio(added(r, 'p50'), added(d, 'p50'))} | {_ratio(added(r, 'p90'), added(d, 'p90'))} | "
                     f"{_ratio(r['saturation_rps'], d['saturation_rps'])} | "
                     f"{_ratio(r['stream_mb_s'], d['stream_mb_s'])} |")
    return lines


def newconn_lines(results: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[str]:
    phases = newconn_phases(results)
    if not phases:
        return []
    d = rows.get(SIDECARS, {}).get("newconn", {})
    base = rows.get(BASELINE, {}).get("newconn", {})
    lines = ["", "## New connections (one request per connection, fixed rate, open loop)", "",
             "*first*: the first connection after the mode was switched on (its capture in place a second "
             "before); pooled HBONE connections are opened ahead of time (pre-warm), so the node agents' first "
             "connection should cost what the others do.", "",
             "| mode | conn/s | p50 | p99 | added p50 | added p99 | p50 vs d | p99 vs d | mesh CPU s / 1,000 conn | "
             "CPU vs d | first |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in rows.items():
        for phase in phases:
            n = r["newconn"].get(phase)
            if n is None:
                continue
            b, dd = base.get(phase, {}), d.get(phase, {})
            cpu = n.get("cpu_per_1k")
            lines.append(f"| {key}: {r['title']} | {phase[len('newconn'):]} | {_us(n['p50'])} | {_us(n['p99'])} | "
                         f"{'-' if key == BASELINE else _added(n['p50'], b.get('p50'))} | "
                         f"{'-' if key == BASELINE else _added(n['p99'], b.get('p99'))} | "
                         f"{_ratio(n['p50'], dd.get('p50'))} | {_ratio(n['p99'], dd.get('p99'))} | "
                         f"{'-' if cpu is None else f'{cpu:.3f}'} | {_ratio(cpu, dd.get('cpu_per_1k'))} | "
                         f"{_us(r['first_connection_us'])} |")
    return lines


def scale_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    scaled = {k: r["scale"] for k, r in rows.items() if r.get("scale")}
    if not scaled:
        return []
    lines = ["", "## Scale: idle tunnels held at once", "",
             f"Bound: both node agents together hold an idle tunnel in at most {SCALE_BOUND_KIB:g} KiB.", "",
             "*RSS fresh*: capture in place, before any load; *RSS idle*: idle again after the load phases.", "",
             "| mode | tunnels | RSS fresh | RSS idle | RSS held | KiB per tunnel (both agents) | within bound | "
             "mesh CPU s / 1,000 conn opened |", "| --- | ---: | --- | --- | --- | ---: | --- | ---: |"]
    for key, sc in scaled.items():
        fresh = _mib({role: kib for role, kib in rows[key].get("rss_fresh_kib", {}).items() if role in sc["rss_idle_kib"]})
        idle, held = _mib(sc["rss_idle_kib"]), _mib(sc["rss_held_kib"])
        ok = "yes" if sc["kib_per_tunnel"] <= SCALE_BOUND_KIB else "**NO**"
        lines.append(f"| {key}: {rows[key]['title']} | {sc['tunnels']:,} (opened at {sc['opened_per_s']:,.0f}/s) | {fresh} | "
                     f"{idle} | {held} | {sc['kib_per_tunnel']:.1f} | {ok} | {sc['cpu_per_1k']:.3f} |")
    return lines


def _mib(kib_by_role: dict[str, int]) -> str:
    return ", ".join(f"{role} {kib / 1024:.0f} MiB" for role, kib in kib_by_role.items()) or "-"


def _status(r: dict[str, Any]) -> str:
    if r["status"].startswith("unavailable"):
        return "unavailable (see below)"
    if r["status"] == "errors" or r["error_count"]:
        return "**ERRORS**"
    return "ok"


def accuracy_lines(results: dict[str, Any]) -> list[str]:
    rounds = _rounds(results, BASELINE)
    opens = [r["phases"]["open"] for r in rounds if "sent" in r["phases"].get("open", {})]
    if not opens:
        return ["No no-mesh figures in this run: the generators' accuracy cannot be shown."]
    target = results["meta"]["settings"]["rate"]
    achieved = [o["achieved_rps"] for o in opens]
    lag = merged_latency(results, BASELINE, "open", "lag")
    out = [f"- fixed rate: asked {target:g} req/s, achieved {min(achieved):g}–{max(achieved):g} req/s; the "
           f"generator's own send lag (write time minus scheduled time) p50 {_us(lag.percentile(50))}, "
           f"p99 {_us(lag.percentile(99))} (part of every latency above, in every mode alike); client CPU "
           f"{statistics.mean(o['client_cpu_seconds'] for o in opens):.2f} s per phase."]
    closed = merged_latency(results, BASELINE, "closed")
    wrk = [r["phases"]["crosscheck"].get("latency_us", {}) for r in rounds if "crosscheck" in r["phases"]]
    wrk = [w for w in wrk if w]
    if closed.total and wrk:
        w50 = statistics.median(w["p50"] for w in wrk)
        w99 = statistics.median(w.get("p99", 0.0) for w in wrk)
        out.append(f"- one connection, closed loop: our generator p50 {_us(closed.percentile(50))} / p99 "
                   f"{_us(closed.percentile(99))}; wrk on the same path p50 {_us(w50)} / p99 {_us(w99)}.")
    return out


def chart(results: dict[str, Any], path: Path) -> None:
    """Latency percentiles (fixed rate, open loop) per mode, one line each, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    xs = list(range(len(CHART_PERCENTILES)))
    plotted = 0
    for key, info in results["modes"].items():
        h = merged_latency(results, key)
        if not h.total:
            continue
        ys = [h.percentile(p) / 1000 for p in CHART_PERCENTILES]
        ax.plot(xs, ys, marker="o", label=f"{key}: {info['title']}" + ("" if info["status"] == "ok" else " (errors)"))
        plotted += 1
    ax.set_xticks(xs, [f"p{p:g}" for p in CHART_PERCENTILES])
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (from scheduled send)")
    meta = results["meta"]
    ax.set_title(f"{meta['settings']['rate']:g} req/s over {meta['settings']['connections']} connections, "
                 f"HTTP/1.1 1 KiB — {meta['host']} {meta['started'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no mode produced latency figures", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_all(results: dict[str, Any], directory: Path) -> dict[str, Path]:
    """`<date>-<host>.json`, `.md` and `.png` in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    stamp = datetime.fromisoformat(meta["started"]).strftime("%Y-%m-%dT%H%M%S")
    base = directory / f"{stamp}-{meta['host']}"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}
    results = dict(results)
    results["summary"] = summarize(results)
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["md"].write_text(markdown(results))
    chart(results, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    """Render the Markdown and PNG again from a results JSON (after a change to the report, say)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("json", type=Path, help="a bench/results/<date>-<host>.json file")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    results.pop("summary", None)
    for path in write_all(results, args.json.parent).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
