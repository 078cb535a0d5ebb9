"""`meshctl bench`: the latency and cost comparison (no mesh, mesh L4, mesh L7, Envoy sidecars)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from mesh.errors import MeshError, UsageError
from waypoint.options import ENGINES

HELP = """Build a dedicated two-node cluster, run the same client and server through each mode in
alternating rounds (a: no mesh, b: mesh L4 through the node agents, c: mesh L7 through a waypoint,
d: Envoy sidecars with mTLS, e: mesh L4 with eBPF capture, f: the L4 floor, Envoy tcp_proxy with mTLS),
with phases of kept-alive requests, new connections at fixed rates, and (b, e) 10,000 idle tunnels held
at once, and write the raw figures (JSON), a Markdown table and a PNG chart to bench/results/. A mode that cannot run here is reported as unavailable with
the reason. The cluster is removed at the end, also when interrupted. Needs root."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="compare latency and cost: no mesh, mesh L4/L7, Envoy sidecars",
                       description=HELP, epilog="examples:\n  meshctl bench\n  meshctl bench --quick\n"
                                                "  meshctl bench --modes a,d --rounds 2 --duration 10",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one round, 5 s phases, a 16 MiB stream (under 5 minutes; the CI smoke setting)")
    p.add_argument("--modes", metavar="LIST", help="modes to run, comma separated, from a,b,c,d,e,f (default all)")
    p.add_argument("--rounds", type=int, metavar="N", help="rounds of all modes (default 3; --quick 1)")
    p.add_argument("--duration", type=float, metavar="S", help="seconds per load phase (default 30; --quick 5)")
    p.add_argument("--rate", type=float, metavar="RPS", help="fixed-rate phase requests/s (default 1000)")
    p.add_argument("--stream-mib", type=int, metavar="MIB", help="single-stream size (default 256; --quick 16)")
    p.add_argument("--newconn-rates", metavar="LIST",
                   help="new connections per second, a phase each, comma separated (default 200,1000; --quick 200)")
    p.add_argument("--scale-tunnels", type=int, metavar="N",
                   help="idle tunnels held in the scale phase of b and e (default 10000; --quick 2000; 0: none)")
    p.add_argument("--client-cpu", type=int, metavar="CPU", help="CPU the client side is pinned to (default: the last)")
    p.add_argument("--cluster-name", metavar="NAME", help="name of the bench cluster (default: bench)")
    p.add_argument("--waypoint-workers", type=int, metavar="N",
                   help="worker processes of mode c's waypoint (default: the local cluster's, 1)")
    p.add_argument("--waypoint-engine", metavar="|".join(ENGINES),
                   help="what moves mode c's waypoint's data path's bytes (default: the waypoint's, uvloop), "
                        "to compare the engines")
    p.add_argument("--output", metavar="DIR", help="where results go (default bench/results)")
    p.set_defaults(func=cmd_bench)


def settings_from(args: argparse.Namespace) -> object:
    from bench.harness import Settings
    from bench.modes import MODES

    overrides: dict[str, Any] = {}
    if args.modes:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise UsageError(f"--modes {args.modes}: choose from {', '.join(MODES)}")
        overrides["modes"] = modes
    if args.rounds is not None:
        if args.rounds < 1:
            raise UsageError("--rounds must be at least 1")
        overrides["rounds"] = args.rounds
    if args.duration is not None:
        if args.duration < 1:
            raise UsageError("--duration must be at least 1 second")
        overrides["duration"] = args.duration
    if args.rate is not None:
        overrides["rate"] = args.rate
    if args.newconn_rates is not None:
        try:
            rates = tuple(float(r) for r in args.newconn_rates.split(",") if r.strip())
        except ValueError:
            raise UsageError(f"--newconn-rates {args.newconn_rates}: write numbers, comma separated") from None
        if any(r <= 0 for r in rates):
            raise UsageError(f"--newconn-rates {args.newconn_rates}: rates must be positive")
        overrides["newconn_rates"] = rates
    if args.scale_tunnels is not None:
        if args.scale_tunnels < 0:
            raise UsageError("--scale-tunnels must be 0 or more")
        overrides["scale_tunnels"] = args.scale_tunnels
    if args.stream_mib is not None:
        overrides["stream_bytes"] = args.stream_mib << 20
    if args.client_cpu is not None:
        overrides["client_cpu"] = args.client_cpu
    if args.cluster_name:
        overrides["cluster_name"] = args.cluster_name
    workers = getattr(args, "waypoint_workers", None)
    if workers is not None:
        if not 1 <= workers <= 8:
            raise UsageError(f"--waypoint-workers {workers}: give a number from 1 to 8")
        overrides["waypoint_workers"] = workers
    engine = getattr(args, "waypoint_engine", None)
    if engine is not None:
        if engine not in ENGINES:
            raise UsageError(f"--waypoint-engine {engine}: give one of {', '.join(ENGINES)}")
        overrides["waypoint_engine"] = engine
    if args.output:
        overrides["output_dir"] = Path(args.output)
    return Settings.quick(**overrides) if args.quick else dataclasses.replace(Settings(), **overrides)


def cmd_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise MeshError("meshctl bench needs root (it builds a cluster of network namespaces): run it as root")
    from bench import report
    from bench.harness import BenchError, Interrupted, Run, Settings

    settings = settings_from(args)
    assert isinstance(settings, Settings)
    try:
        results = Run(settings).execute()
    except BenchError as exc:
        raise MeshError(str(exc)) from exc
    except Interrupted:
        print("meshctl bench: interrupted; the bench cluster was removed, no results written")
        return 130
    paths = report.write_all(results, settings.output_dir)
    print()
    print(paths["md"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 1 if any(m["status"] == "errors" for m in results["modes"].values()) else 0
