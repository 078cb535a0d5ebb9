"""What tracing costs: mode c (through the waypoint) with 100% and with 1% sampling, side by side in one run.

    python -m bench.tracing_cost                    # 2 rounds, 10 s phases (about 2 minutes; needs root)
    python -m bench.tracing_cost --quick            # 1 round, 3 s phases
    python -m bench.tracing_cost --output FILE.json

One cluster (the bench's own file, `bench/cluster.yaml`, under the name `bench-tracing`), its node agents and
waypoint exporting spans over OTLP/HTTP to a receiver on the underlay's gateway that keeps them (what a
collector costs is not the mesh's, but the export is), and the bench namespace in mode c, as `meshctl bench`
sets it up (`bench.modes.MeshL7`).  The sampling is set mesh-wide by a `Telemetry` in the root namespace, so
it applies to the waypoint's request spans and to the node agents' tunnel spans alike; a sampling is
measured once the waypoint's configuration shows it.  Samplings alternate within each round (100%, 1%, then
1%, 100%, ...), so that the machine's drift affects both alike.

Per sampling and round, with the fixed-rate generator of the bench (`bench.loadgen`):
- open: `--rate` requests/s (100) over 4 connections for `--duration` s: latency percentiles, and the CPU seconds of
  the waypoint and of the node agents per 1,000 requests completed;
- closed: one connection, closed loop: the added latency of the hops;
- the spans the receiver got from the waypoint per request (about 1 and 0.01: proof that the sampling was on).

The report is the ratios 100% / 1% (1.00 = tracing costs nothing at full sampling), from the sums over the
rounds (CPU per request) and the medians of the rounds (latencies); every raw figure is in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness
from bench.modes import MeshL7, PathError, Unavailable
from bench.netio import tree_cpu_seconds
from localcluster import lifecycle, spec
from localcluster.plan import cluster_prefix
from mesh.defaults import ROOT_NAMESPACE
from mesh.errors import MeshError
from mesh.serve import client
from mesh.serve.errors import ServeError
from mesh.tracing.receiver import OtlpReceiver, TraceStore

SAMPLINGS = (100.0, 1.0)
OTLP_PORT = 4318
TELEMETRY_NAME = "bench-tracing"
SWITCH_TIMEOUT = 30.0
WAYPOINT_ADMIN = 15000
PROBE_REQUESTS = 200
EXPORT_SETTLE = 2.5  # seconds: more than the exporters' interval (1 s), for the last spans to arrive


@dataclass(frozen=True)
class Settings:
    rounds: int = 2
    duration: float = 10.0  # seconds of each phase
    rate: float = 100.0  # requests/s of the open phase: well below the waypoint's saturation on a small machine
    connections: int = 4
    cluster_file: Path = harness.CLUSTER_FILE
    cluster_name: str = "bench-tracing"
    output: Path | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        return dataclasses.replace(cls(rounds=1, duration=3.0), **overrides)

    def order(self, round_no: int) -> tuple[float, ...]:
        """The samplings of round `round_no` (1-based), alternating which goes first."""
        return SAMPLINGS if round_no % 2 else tuple(reversed(SAMPLINGS))


def telemetry_yaml(percentage: float) -> str:
    """The mesh-wide Telemetry that sets the sampling."""
    return (f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: {TELEMETRY_NAME}\n"
            f"  namespace: {ROOT_NAMESPACE}\nspec:\n  tracing:\n  - randomSamplingPercentage: {percentage:g}\n")


def probe_completed(text: str) -> int:
    """The requests a `bench.loadgen` run completed, from its JSON line (0 when there is none)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return int(json.loads(line).get("completed", 0))
            except (ValueError, TypeError):
                return 0
    return 0


def per_thousand(cpu_seconds: float, requests: int) -> float | None:
    return round(1000.0 * cpu_seconds / requests, 4) if requests else None


def ratio(high: float | None, low: float | None) -> float | None:
    """`high / low`, None when either is missing or `low` is 0."""
    if high is None or low is None or low == 0:
        return None
    return round(high / low, 3)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per sampling: CPU per 1,000 requests (sums over the rounds), latencies (medians of the rounds), spans per
    request; and the ratios 100% / 1%."""
    out: dict[str, Any] = {"samplings": {}, "ratios": {}}
    for pct in SAMPLINGS:
        mine = [r for r in rounds if r["sampling"] == pct]
        requests = sum(r["open"].get("completed", 0) for r in mine)

        def median(key: str, phase: str = "open", rows: list[dict[str, Any]] = mine) -> float | None:
            values = [r[phase].get("latency_us", {}).get(key) for r in rows]
            present = [v for v in values if v is not None]
            return statistics.median(present) if present else None

        out["samplings"][f"{pct:g}%"] = {
            "requests": requests,
            "waypoint_cpu_per_1k": per_thousand(sum(r["cpu"]["waypoint"] for r in mine), requests),
            "agents_cpu_per_1k": per_thousand(sum(r["cpu"]["nodeagents"] for r in mine), requests),
            "open_p50_us": median("p50"), "open_p99_us": median("p99"), "closed_p50_us": median("p50", "closed"),
            "waypoint_spans_per_request": round(sum(r["waypoint_spans"] for r in mine) / requests, 4)
            if requests else None,
            "errors": sum(r["open"].get("error_count", 0) + r["closed"].get("error_count", 0) for r in mine),
        }
    hi, lo = (out["samplings"][f"{p:g}%"] for p in SAMPLINGS)
    for key in ("waypoint_cpu_per_1k", "agents_cpu_per_1k", "open_p50_us", "open_p99_us", "closed_p50_us"):
        out["ratios"][key] = ratio(hi[key], lo[key])
    return out


def render(summary: dict[str, Any]) -> str:
    """The table printed at the end (Markdown)."""
    cols = ("waypoint_cpu_per_1k", "agents_cpu_per_1k", "open_p50_us", "open_p99_us", "closed_p50_us",
            "waypoint_spans_per_request", "requests", "errors")
    lines = ["| sampling | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 1) + "|"]
    for name, row in summary["samplings"].items():
        lines.append(f"| {name} | " + " | ".join("-" if row[c] is None else f"{row[c]:g}" for c in cols) + " |")
    ratios = summary["ratios"]
    lines.append("| ratio 100% / 1% | " + " | ".join(
        ("-" if ratios.get(c) is None else f"{ratios[c]:.2f}") if c in ratios else "" for c in cols) + " |")
    return "\n".join(lines)


class CostRun:
    """One run: the cluster, mode c, the samplings in rounds, the figures."""

    def __init__(self, settings: Settings, say: Callable[[str], None] = harness.say) -> None:
        self.s = settings
        self.say = say
        self.store = TraceStore(max_traces=1_000_000)
        self.hs = harness.Settings.quick(duration=settings.duration, rate=settings.rate,
                                         connections=settings.connections, cluster_file=settings.cluster_file)

    def execute(self) -> dict[str, Any]:
        s = self.s
        cluster_spec = dataclasses.replace(spec.load(s.cluster_file), name=s.cluster_name)
        gateway = next(iter(cluster_spec.underlay_cidr.hosts()))
        cluster_spec = spec.with_observability(cluster_spec, prometheus=False,
                                               otlp_endpoint=f"http://{gateway}:{OTLP_PORT}/v1/traces")
        results: dict[str, Any] = {"meta": {"cluster": s.cluster_name, "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()}}, "rounds": []}
        receiver: OtlpReceiver | None = None
        try:
            self.say(f"building the cluster {s.cluster_name!r} from {s.cluster_file}")
            cluster = lifecycle.up(cluster_spec, say=self.say)
            receiver = OtlpReceiver(self.store.add, str(gateway), OTLP_PORT, netns=cluster.plan.underlay_netns)
            receiver.start()
            ctx = harness._context(cluster, self.hs)  # the bench's own view of its cluster
            mode = MeshL7()
            mode.enter(ctx)
            target = f"{ctx.service_ip}:{harness.HTTP_SERVICE_PORT}"
            for round_no in range(1, s.rounds + 1):
                for pct in s.order(round_no):
                    self._set_sampling(ctx, pct)
                    self._prove(ctx, mode, target)
                    results["rounds"].append(self._measure(ctx, mode, round_no, pct, target))
        finally:
            if receiver is not None:
                receiver.stop()
            removed = lifecycle.down(s.cluster_name)
            self.say(f"cluster {s.cluster_name!r} removed ({', '.join(removed) or 'nothing left'})")
        results["summary"] = summarize(results["rounds"])
        return results

    def _waypoint_sampling(self, ctx: harness.Context) -> float | None:
        netns = f"{cluster_prefix(ctx.cluster)}pod.{ctx.namespace}.waypoint"
        try:
            reply = client.get(client.Endpoint.tcp("127.0.0.1", WAYPOINT_ADMIN, netns=netns), "/config_dump",
                               timeout=5)
            value = reply.json().get("tracing", {}).get("sampling") if reply.status == 200 else None
        except (ServeError, MeshError, ValueError):
            return None
        return float(value) if value is not None else None

    def _set_sampling(self, ctx: harness.Context, pct: float) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(telemetry_yaml(pct))
        try:
            ctx.meshctl_ok("apply", "-f", f.name)
        finally:
            Path(f.name).unlink(missing_ok=True)
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while self._waypoint_sampling(ctx) != pct:
            if time.monotonic() > deadline:
                raise Unavailable(f"the waypoint did not take the {pct:g}% sampling within {SWITCH_TIMEOUT:g}s")
            time.sleep(0.2)

    def _prove(self, ctx: harness.Context, mode: MeshL7, target: str) -> None:
        """A short probe that the waypoint and the agents carry the traffic (as the bench proves every mode); a
        few tries, as the mode may need a moment to take effect."""
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while True:
            before = mode.counters(ctx)
            text, _, _ = harness.run_client(ctx, self.hs, [
                sys.executable, "-m", "bench.loadgen", "--target", target, "--rate", "400", "--connections", "4",
                "--duration", f"{PROBE_REQUESTS / 400:g}"], 30)
            completed = probe_completed(text)
            try:
                if completed < PROBE_REQUESTS:
                    raise PathError(f"the probe completed {completed} of {PROBE_REQUESTS} requests")
                mode.check_path(ctx, before, mode.counters(ctx), PROBE_REQUESTS)
                return
            except PathError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _measure(self, ctx: harness.Context, mode: MeshL7, round_no: int, pct: float, target: str) -> dict[str, Any]:
        procs = mode.procs(ctx)
        record: dict[str, Any] = {"round": round_no, "sampling": pct}
        time.sleep(EXPORT_SETTLE)  # the spans of what ran before (the probe) have arrived
        spans0 = self._waypoint_spans()
        cpu0 = {p.role: tree_cpu_seconds(p.pid) for p in procs}
        for phase in ("open", "closed"):
            self.say(f"[round {round_no}/{self.s.rounds}] sampling {pct:g}%: {phase}")
            record[phase] = harness.run_phase(ctx, self.hs, phase, target, "")
            if phase == "open":
                cpu = {p.role: tree_cpu_seconds(p.pid) - cpu0[p.role] for p in procs}
                record["cpu"] = {"waypoint": round(sum(v for k, v in cpu.items() if k.startswith("waypoint")), 3),
                                 "nodeagents": round(sum(v for k, v in cpu.items() if k.startswith("nodeagent")), 3)}
                time.sleep(EXPORT_SETTLE)  # the exporters' last batches of the phase
                record["waypoint_spans"] = self._waypoint_spans() - spans0
        return record

    def _waypoint_spans(self) -> int:
        return sum(1 for t in self.store.traces() for sp in self.store.trace(t.trace_id)
                   if sp.resource.get("istio.proxy") == "waypoint")


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round, 3 s phases")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float, metavar="SECONDS", help="seconds of each phase")
    p.add_argument("--rate", type=float, help="requests/s of the open phase (default 100)")
    p.add_argument("--cluster-name", help="the cluster's name (default bench-tracing)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write every raw figure there as JSON")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("duration", args.duration), ("rate", args.rate),
                                   ("cluster_name", args.cluster_name), ("output", args.output)) if v is not None}
    if overrides.get("rounds", 1) < 1 or overrides.get("duration", 1) <= 0 or overrides.get("rate", 1) <= 0:
        p.error("--rounds, --duration and --rate must be above 0")
    return Settings.quick(**overrides) if args.quick else dataclasses.replace(Settings(), **overrides)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        lifecycle.require_root("python -m bench.tracing_cost")
        results = CostRun(settings).execute()
    except (Unavailable, PathError, MeshError, harness.BenchError) as exc:
        print(f"tracing_cost: {exc}", file=sys.stderr)
        return 1
    if settings.output is not None:
        settings.output.write_text(json.dumps(results, indent=1))
    print(render(results["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
