"""The waypoint's request pipeline alone: its CPU seconds per 1,000 requests and its added latency.

One waypoint proxy (`waypoint.proxy.WaypointProxy`, the same code the waypoint process runs) serves plain
TCP connections on 127.0.0.1 as if each were an inbound tunnel to a service VIP, and routes them to the
benchmark's server (`bench/server.py`, a 1 KiB answer).  No HBONE or TLS: what is measured is the L7 work
(parsing, routing, policies, forwarding, metrics, access log).  The load is `bench/loadgen.py`: a fixed rate
over 16 keep-alive connections, then one connection closed loop; with `--newconn RATE`, then a phase where
every request opens a connection (a tunnel) of its own (`bench/newconn_bench.py`), its CPU per 1,000
connections reported as `newconn.cpu_s_per_1000`.  The proxy's CPU time is read from `/proc/<pid>/stat`
before and after each phase.

    python -m bench.waypoint_bench [--rate 1000] [--duration 5] [--closed-duration 3] [--newconn RATE]
        [--engine trio|asyncio] [--profile FILE]

`--engine asyncio` serves the same table, metrics and access log with the waypoint's hop on the engine
(`waypoint.engine.hop`: asyncio Protocols on uvloop, the waypoint's default data path) alone on a TCP
listener.  `--profile FILE` runs the proxy under cProfile (counting CPU time) and writes its stats to
FILE (slower; for finding costs, not for figures).  Prints one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.ports import free_port as _free_port

if TYPE_CHECKING:
    from waypoint.config import RouteTable
    from waypoint.l7.model import ClientInfo

ROOT = Path(__file__).resolve().parent.parent
VIP = "10.96.0.77"
NS = "bench"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def bench_table(backend_port: int, *, in_mesh: bool = False) -> RouteTable:
    """The route table of the benchmark's waypoint: one service (`VIP`:80) whose one endpoint is the backend
    (127.0.0.1:`backend_port`, the bench's server account); `in_mesh`: the service bound to this waypoint
    and its endpoint reached over HBONE (`bench.waypoint_hbone_bench`)."""
    from mesh.proto import discovery_pb2 as pb
    from waypoint.config import compile_table

    hostname = f"server.{NS}.svc.cluster.local"
    svc = pb.Service(name="server", namespace=NS, hostname=hostname, vips=[VIP],
                     ports=[pb.ServicePort(service_port=80, target_port=backend_port, name="http")])
    wl = pb.Workload(uid=f"{NS}/server", name="server", namespace=NS, addresses=["127.0.0.1"],
                     service_account="server", canonical_name="server", canonical_revision="v1",
                     labels={"app": "server"},
                     services={f"{NS}/{hostname}": pb.PortList(ports=[pb.PortMapping(service_port=80,
                                                                                      target_port=backend_port)])})
    if in_mesh:
        svc.waypoint.CopyFrom(pb.GatewayAddress(name="waypoint", namespace=NS))
        wl.tunnel_protocol = pb.HBONE
    result = compile_table(f"{NS}/waypoint", [wl], [svc], [], 1)
    if result.errors:
        raise SystemExit(f"route table: {result.errors}")
    return result.table


def client_info(peer: tuple[str, int]) -> ClientInfo:
    """Who sent a tunnel: a client of the bench's namespace, from the connection's peer, to the VIP."""
    from waypoint.l7.model import ClientInfo

    return ClientInfo("spiffe://cluster.local/ns/bench/sa/client", f"{peer[0]}:{peer[1]}", f"{VIP}:80")


def serve_proxy(front_port: int, backend_port: int, access_log: str, profile: str = "",
                engine: str = "trio") -> None:
    """The proxy process: one waypoint routing every connection on `front_port` to the backend."""
    import logging
    from functools import partial

    import trio

    from waypoint.accesslog import logger_sink
    from waypoint.proxy import WaypointProxy
    from waypoint.upstream.pool import TcpUpstream

    def discard(line: str) -> None:
        pass

    if access_log == "none":
        sink = discard
    else:  # as the process does: a logger that writes the line (to /dev/null here)
        handler = logging.FileHandler(os.devnull)
        log = logging.getLogger("waypoint.access")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        sink = logger_sink
    if engine == "asyncio":
        _serve_asyncio(front_port, bench_table(backend_port), sink, profile)
        return
    proxy = WaypointProxy(TcpUpstream(), bench_table(backend_port), access_log=sink)

    async def handle(stream: trio.SocketStream) -> None:
        await proxy.serve_tunnel(stream, client_info(stream.socket.getpeername()))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            await nursery.start(partial(trio.serve_tcp, handle, front_port, host="127.0.0.1"))

    if not profile:
        trio.run(main)
        return
    import cProfile

    profiler = cProfile.Profile(time.process_time)  # CPU time, not time spent waiting for the CPU
    def write_stats(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(profile)
        os._exit(0)

    signal.signal(signal.SIGINT, write_stats)
    profiler.enable()
    trio.run(main)


def serve(hop: Any, host: str, port: int) -> None:
    """Run the engine's hop alone on a TCP listener on `hop.loop` until SIGINT."""
    loop = hop.loop
    server = loop.run_until_complete(hop.serve(host, port))
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


def _serve_asyncio(front_port: int, table: RouteTable, sink: Callable[[str], None], profile: str) -> None:
    """The engine's hop on uvloop, over a `WaypointProxy` object that holds the same table, metrics and
    sink (and runs the pipeline's synchronous steps)."""
    import uvloop

    from waypoint.engine.hop import EngineHop
    from waypoint.proxy import WaypointProxy
    from waypoint.upstream.pool import TcpUpstream

    loop = uvloop.new_event_loop()
    # (the proxy's clock times each request: uvloop's `loop.time` counts whole milliseconds)
    hop = EngineHop(WaypointProxy(TcpUpstream(), table, access_log=sink, clock=time.monotonic), loop, client_info)
    if not profile:
        serve(hop, "127.0.0.1", front_port)
        return
    import cProfile

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        serve(hop, "127.0.0.1", front_port)
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


def _loadgen(port: int, *extra: str) -> dict:
    return _run_json([sys.executable, "-m", "bench.loadgen", "--target", f"127.0.0.1:{port}", *extra])


def _run_json(argv: list[str]) -> dict:
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    try:
        return dict(json.loads(out.stdout))
    except json.JSONDecodeError:
        raise SystemExit(f"{argv[2]} failed: {out.stdout}{out.stderr}") from None


def _summary(result: dict) -> dict:
    keep = ("completed", "error_count", "errors", "achieved_rps", "latency_us")
    return {k: result[k] for k in keep if k in result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.waypoint_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--closed-duration", type=float, default=3.0)
    p.add_argument("--newconn", type=float, default=0.0, metavar="RATE",
                   help="new connections per second in a last phase (default 0: none)")
    p.add_argument("--newconn-duration", type=float, default=5.0)
    p.add_argument("--access-log", choices=("logger", "none"), default="logger")
    p.add_argument("--engine", choices=("trio", "asyncio"), default="trio",
                   help="the proxy's: the trio WaypointProxy (default), or the engine's hop (asyncio on uvloop)")
    p.add_argument("--profile", metavar="FILE", default="")
    p.add_argument("--serve", nargs=2, type=int, metavar=("FRONT", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_proxy(args.serve[0], args.serve[1], args.access_log, args.profile, args.engine)
        return 0
    backend_port, front_port = _free_port(), _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "server.py"), "--http-port", str(backend_port),
                               "--sink-port", str(_free_port())], cwd=ROOT)]
    try:
        _wait_port(backend_port)
        cmd = [sys.executable, "-m", "bench.waypoint_bench", "--access-log", args.access_log,
               "--engine", args.engine, "--serve", str(front_port), str(backend_port)]
        if args.profile:
            cmd += ["--profile", args.profile]
        proxy = subprocess.Popen(cmd, cwd=ROOT)
        procs.append(proxy)
        _wait_port(front_port)
        _loadgen(front_port, "--closed", "--connections", "16", "--duration", "1")  # warm up
        report: dict = {"rate": args.rate}
        if args.engine != "trio":
            report["engine"] = args.engine
        cpu0 = _cpu_seconds(proxy.pid)
        opened = _loadgen(front_port, "--rate", str(args.rate), "--connections", "16",
                          "--duration", str(args.duration))
        cpu = _cpu_seconds(proxy.pid) - cpu0
        done = max(1, int(opened.get("completed", 0)))
        report["open"] = _summary(opened)
        report["proxy_cpu_seconds"] = round(cpu, 3)
        report["cpu_s_per_1000"] = round(cpu * 1000 / done, 4)
        closed = _loadgen(front_port, "--closed", "--connections", "1", "--duration", str(args.closed_duration))
        report["closed"] = _summary(closed)
        if args.newconn > 0:
            cpu0 = _cpu_seconds(proxy.pid)
            fresh = _run_json([sys.executable, "-m", "bench.newconn_bench", "--target", f"127.0.0.1:{front_port}",
                               "--rate", str(args.newconn), "--duration", str(args.newconn_duration)])
            cpu = _cpu_seconds(proxy.pid) - cpu0
            report["newconn"] = {**_summary(fresh), "proxy_cpu_seconds": round(cpu, 3),
                                 "cpu_s_per_1000": round(cpu * 1000 / max(1, int(fresh.get("completed", 0))), 4)}
        print(json.dumps(report))
    finally:
        for proc in reversed(procs):
            proc.send_signal(2)  # SIGINT: cProfile writes its stats on the way out
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
