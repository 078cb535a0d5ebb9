"""The whole waypoint hop, its two HBONE legs included: CPU seconds per 1,000 requests on each engine.

    python -m bench.waypoint_hbone_bench [--pairs 4] [--rate 1000] [--duration 5] [--newconn 200]

Shape (loopback, certificates made by `bench.relay_bench.make_certs`):

    loadgen -> client relay --HBONE--> the hop --HBONE--> server relay -> bench/server.py (1 KiB answers)
               (plain in)             (mTLS in, L7,       (plain out)
                                       mTLS out)

The relays are `bench.relay_bench`'s engine relays (the node agents' data path: asyncio Protocols on
uvloop), the same for both variants; the client relay CONNECTs to the service VIP (`VIP`:80) over a pooled
HBONE connection to the hop, as a source node agent sends to a waypoint.  The hop is one process:

- `trio`: the waypoint's own pieces, as `waypoint.app.Waypoint` assembles them: `InboundServer` (mutual
  TLS, `admit`, `WaypointProxy.serve_tunnel`), `WaypointProxy`, and `HboneUpstream` over an `HbonePool`
  whose `hbone_port` is the server relay's port (the endpoint is 127.0.0.1, so its "node agent" is the
  server relay);
- `asyncio`: the waypoint's hop on the engine (`waypoint.engine.hop`) between the engine's tunnels on
  one uvloop loop: `serve_tls` with `admit` and `EngineHop.take_tunnel`, upstream tunnels from an
  `AioPool` (`TunnelPool`).

Both serve one route table (`hbone_table`: the service bound to this waypoint, its endpoint in the mesh),
write the access log to a logger (to /dev/null, as `bench.waypoint_bench`), and present the bench's
server certificate inbound and its client certificate outbound.  Server, relays and hop share CPU 0, the
generators run on CPU 1.

Per run: a warm-up, the fixed-rate phase (`--rate` over 16 keep-alive connections, `--duration` s: the
hop's and the relays' CPU seconds per 1,000 requests from /proc, p50 from the scheduled time), one
connection closed loop (its requests a second and p50), and with `--newconn RATE` a phase where every
request opens a connection (a tunnel through the hop) of its own (CPU per 1,000 connections).  Runs are
paired and alternated (trio, asyncio, asyncio, trio, ...); prints every pair, the median ratios
(asyncio / trio) and one JSON line with everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.relay_bench import (
    CLIENT_ID,
    ROOT,
    SERVER_ID,
    contexts,
    cpu_seconds,
    free_port,
    make_certs,
    on_cpu,
    run_json,
    serve_hbone_on,
    wait_port,
)
from bench.waypoint_bench import VIP, bench_table

if TYPE_CHECKING:
    from waypoint.config import RouteTable

ENGINES = ("trio", "asyncio")
TRUST_DOMAIN = "cluster.local"


def hbone_table(backend_port: int) -> RouteTable:
    """One service (`VIP`:80) bound to this waypoint, whose one endpoint (127.0.0.1:`backend_port`, the
    bench's server account) is in the mesh: reached over HBONE."""
    return bench_table(backend_port, in_mesh=True)


def access_log() -> Callable[[str], None]:
    """The waypoint's logger sink, its lines written to /dev/null (as `bench.waypoint_bench` does)."""
    from waypoint.accesslog import logger_sink

    log = logging.getLogger("waypoint.access")
    log.addHandler(logging.FileHandler(os.devnull))
    log.setLevel(logging.INFO)
    log.propagate = False
    return logger_sink


# -- the hop (a child process) ---------------------------------------------------------------------------


class _FixedCerts:
    """What `InboundServer` reads of its `SecretManager`: one server context, always ready."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx

    async def get(self, identity: object) -> None:
        return None

    def server_context(self, identity: object) -> ssl.SSLContext:
        return self.ctx


def serve_trio(port: int, hbone_port: int, table: RouteTable, certs: Path) -> None:
    import trio

    from mesh.hbone.pool import HbonePool, tcp_connect
    from mesh.identity import SpiffeId
    from waypoint.inbound import InboundServer
    from waypoint.proxy import WaypointProxy
    from waypoint.upstream.connect import HboneUpstream

    outbound = contexts(certs, "client")
    pool = HbonePool(tcp_connect, lambda _: outbound)
    upstream = HboneUpstream(pool, SpiffeId.parse(CLIENT_ID), trust_domain=TRUST_DOMAIN, hbone_port=hbone_port)
    proxy = WaypointProxy(upstream, table, access_log=access_log(), identity=SERVER_ID)
    inbound = InboundServer(proxy, _FixedCerts(contexts(certs, "server")), SpiffeId.parse(SERVER_ID),  # type: ignore[arg-type]
                            trust_domain=TRUST_DOMAIN)
    proxy.l4_handler = inbound.l4

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            await nursery.start(proxy.run)
            await nursery.start(inbound.serve, "127.0.0.1", port)

    trio.run(main)


def serve_asyncio(port: int, hbone_port: int, table: RouteTable, certs: Path) -> None:
    import uvloop

    from mesh.hbone.aio import AioAcceptor
    from mesh.hbone.aiopool import AioPool, tcp_connect
    from mesh.hbone.server import InboundRequest
    from mesh.identity import SpiffeId
    from waypoint.engine.hop import EngineHop, TunnelPool, admitted
    from waypoint.inbound import Refusal, admit
    from waypoint.proxy import WaypointProxy
    from waypoint.upstream.pool import TcpUpstream

    outbound, inbound = contexts(certs, "client"), contexts(certs, "server")
    loop = uvloop.new_event_loop()
    # (the proxy's clock times each request: uvloop's `loop.time` counts whole milliseconds)
    proxy = WaypointProxy(TcpUpstream(), table, access_log=access_log(), clock=time.monotonic, identity=SERVER_ID)
    hop = EngineHop(proxy, loop, admitted)
    hop.pool = TunnelPool(hop, AioPool(tcp_connect, lambda _: outbound), SpiffeId.parse(CLIENT_ID),
                          trust_domain=TRUST_DOMAIN, hbone_port=hbone_port)

    async def handler(request: InboundRequest, acceptor: AioAcceptor) -> None:
        # (the engine inbound's admission, without its allowance for configuration skew)
        decision = admit(proxy.table, request.authority, request.peer, request.forwarded_for, request.peer_address)
        if isinstance(decision, Refusal):
            acceptor.reject(decision.status, decision.reason)
        else:
            hop.take_tunnel(acceptor.accept(), decision)

    async def main() -> None:
        hop.start()
        serve_hbone_on(loop, port, inbound, handler, TRUST_DOMAIN)
        await asyncio.Event().wait()

    loop.run_until_complete(main())


# -- the driver ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_path(engine: str, certs: Path, backend_port: int) -> Iterator[tuple[int, dict[str, int]]]:
    """The path up to the backend, started: (the client relay's plain port, the pids of hop and relays)."""
    relay = [sys.executable, "-m", "bench.relay_bench", "relay", "--variant", "engine", "--certs", str(certs)]
    server_hbone, hop_port, plain = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(on_cpu(0, [*relay, "--side", "server", "--listen", str(server_hbone), "--upstream", "unused"],
                            cwd=ROOT))
        procs.append(on_cpu(0, [sys.executable, "-m", "bench.waypoint_hbone_bench", "hop", "--engine", engine,
                                "--listen", str(hop_port), "--hbone-port", str(server_hbone),
                                "--backend", str(backend_port), "--certs", str(certs)], cwd=ROOT))
        procs.append(on_cpu(0, [*relay, "--side", "client", "--listen", str(plain),
                                "--upstream", f"127.0.0.1:{hop_port},{VIP}:80"], cwd=ROOT))
        for port in (server_hbone, hop_port, plain):
            wait_port(port)
        yield plain, {"server_relay": procs[0].pid, "hop": procs[1].pid, "client_relay": procs[2].pid}
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait()


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _per_1000(before: dict[str, float], after: dict[str, float], done: int) -> dict[str, float]:
    hop = (after["hop"] - before["hop"]) * 1000 / max(done, 1)
    relays = sum(after[k] - before[k] for k in ("client_relay", "server_relay")) * 1000 / max(done, 1)
    return {"hop": round(hop, 4), "relays": round(relays, 4)}


def measure(engine: str, args: argparse.Namespace, certs: Path, backend_port: int) -> dict[str, Any]:
    with running_path(engine, certs, backend_port) as (plain, pids):
        loadgen = [sys.executable, "-m", "bench.loadgen", "--target", f"127.0.0.1:{plain}"]
        run_json([*loadgen, "--rate", str(args.rate), "--connections", "16", "--duration", "1"], 1)  # warm-up
        cpu0 = _cpu(pids)
        fixed = run_json([*loadgen, "--rate", str(args.rate), "--connections", "16", "--duration",
                          str(args.duration)], 1)
        cpu1 = _cpu(pids)
        closed = run_json([*loadgen, "--closed", "--connections", "1", "--duration", str(args.duration)], 1)
        result: dict[str, Any] = {
            "engine": engine, "completed": fixed.get("completed", 0), "errors": fixed.get("error_count", -1),
            "cpu_per_1000": _per_1000(cpu0, cpu1, int(fixed.get("completed", 0))),
            "p50_us": fixed.get("latency_us", {}).get("p50", 0),
            "closed_rps": round(float(closed.get("achieved_rps", 0.0)), 1),
            "closed_p50_us": closed.get("latency_us", {}).get("p50", 0),
            "closed_errors": closed.get("error_count", -1), "error_reasons": fixed.get("errors", {})}
        if args.newconn > 0:
            cpu2 = _cpu(pids)
            fresh = run_json([sys.executable, "-m", "bench.newconn_bench", "--target", f"127.0.0.1:{plain}",
                              "--rate", str(args.newconn), "--duration", str(args.duration)], 1)
            cpu3 = _cpu(pids)
            result["newconn"] = {"completed": fresh.get("completed", 0), "errors": fresh.get("error_count", -1),
                                 "error_reasons": fresh.get("errors", {}),
                                 "p50_us": fresh.get("latency_us", {}).get("p50", 0),
                                 "cpu_per_1000": _per_1000(cpu2, cpu3, int(fresh.get("completed", 0)))}
    return result


def _row(r: dict[str, Any]) -> str:
    cpu, new = r["cpu_per_1000"], r.get("newconn", {})
    newcpu = new.get("cpu_per_1000", {"hop": 0.0, "relays": 0.0})
    return (f"{r['engine']:8} {cpu['hop']:8.4f} {cpu['relays']:8.4f} {r['p50_us']:8.0f} {r['closed_rps']:8.0f} "
            f"{r['closed_p50_us']:8.0f} {newcpu['hop']:8.4f} {newcpu['relays']:8.4f} {new.get('p50_us', 0):8.0f} "
            f"{r['errors']:>4}/{new.get('errors', '-')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.waypoint_hbone_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    h = sub.add_parser("hop", help="(the hop's process, started by the driver)")
    h.add_argument("--engine", choices=ENGINES, required=True)
    h.add_argument("--listen", type=int, required=True)
    h.add_argument("--hbone-port", type=int, required=True)
    h.add_argument("--backend", type=int, required=True)
    h.add_argument("--certs", required=True)
    p.add_argument("--pairs", type=int, default=4, help="pairs of runs, alternated (default 4)")
    p.add_argument("--rate", type=float, default=1000.0, help="requests a second in the fixed-rate phase")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of each phase (default 5)")
    p.add_argument("--newconn", type=float, default=200.0, metavar="RATE",
                   help="new connections a second in the last phase (0: no such phase)")
    args = p.parse_args(argv)
    if args.cmd == "hop":
        serve = serve_trio if args.engine == "trio" else serve_asyncio
        serve(args.listen, args.hbone_port, hbone_table(args.backend), Path(args.certs))
        return 0
    pairs: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        make_certs(certs)
        http, sink = free_port(), free_port()
        origin = on_cpu(0, [sys.executable, str(ROOT / "bench" / "server.py"), "--http-port", str(http),
                            "--sink-port", str(sink)])
        try:
            wait_port(http)
            for i in range(args.pairs):
                order = ENGINES if i % 2 == 0 else ENGINES[::-1]
                pair = {engine: measure(engine, args, certs, http) for engine in order}
                pairs.append(pair)
                print(f"pair {i + 1} ({order[0]} first)", file=sys.stderr, flush=True)
        finally:
            origin.kill()
            origin.wait()
    print(f"{args.rate:.0f} req/s x {args.duration:g} s; CPU s per 1,000 requests (hop, both relays); p50 in us; "
          f"closed loop: 1 connection; new connections: {args.newconn:.0f}/s")
    print(f"{'engine':8} {'hop':>8} {'relays':>8} {'p50':>8} {'closed':>8} {'c.p50':>8} {'new hop':>8} "
          f"{'new rel':>8} {'new p50':>8} errors")
    ratios: dict[str, list[float]] = {"hop_cpu": [], "closed_rps": [], "newconn_hop_cpu": []}
    for i, pair in enumerate(pairs):
        print(f"-- pair {i + 1}")
        for engine in ENGINES:
            print(_row(pair[engine]))
        t, a = pair["trio"], pair["asyncio"]
        ratios["hop_cpu"].append(a["cpu_per_1000"]["hop"] / max(t["cpu_per_1000"]["hop"], 1e-9))
        ratios["closed_rps"].append(a["closed_rps"] / max(t["closed_rps"], 1e-9))
        if "newconn" in t:
            ratios["newconn_hop_cpu"].append(a["newconn"]["cpu_per_1000"]["hop"]
                                             / max(t["newconn"]["cpu_per_1000"]["hop"], 1e-9))
    medians = {k: round(statistics.median(v), 3) for k, v in ratios.items() if v}
    print("median ratios asyncio/trio: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    print(json.dumps({"pairs": pairs, "ratios": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
                      "median_ratios": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
