"""HBONE cost on loopback: one tunnel (our client and server, mutual TLS 1.3, HTTP/2 CONNECT) against a
plain TCP connection, in the same run and the same process.

    python -m bench.hbone_bench [--megabytes 200] [--round-trips 2000]

Throughput: the client sends N MiB and half-closes; the server counts them and answers "ok".
Latency: 1 KiB request, 1 KiB response, one after the other; p50 and p99 of the round trip.
Both ends run in one trio process (one core), so the tunnel figures include both sides' CPU.
The certificates come from a throwaway CA made for the run.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.histogram import exact_percentile
from ca.authority import CertificateAuthority
from mesh.hbone.client import open_hbone_connection
from mesh.hbone.server import InboundRequest, TunnelAcceptor, serve_hbone
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context, server_context

CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/bench/sa/server")
CHUNK = 256 * 1024
MESSAGE = 1024

Stream = trio.abc.HalfCloseableStream


@dataclass(frozen=True)
class Figures:
    mb_per_s: float
    p50_us: float
    p99_us: float


def mint(authority: CertificateAuthority, identity: SpiffeId) -> Svid:
    key = generate_key()
    issued = authority.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1))
    return accept_issued(issued.pems, key, identity, load_trust_bundle(authority.root_pem))


async def sink(stream: trio.abc.Stream) -> None:
    """Server side of both tests: in 'bulk' mode count to EOF and answer; in 'echo' mode answer each
    1 KiB request with 1 KiB."""
    mode = await receive_exactly(stream, 4)
    if mode == b"bulk":
        while await stream.receive_some(1 << 20):
            pass
        await stream.send_all(b"ok")
    else:
        while request := await receive_exactly(stream, MESSAGE):
            await stream.send_all(request)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        if not data:
            return b""
        out += data
    return bytes(out)


async def measure(open_stream: Callable[[], Awaitable[Stream]], megabytes: int, round_trips: int) -> Figures:
    block = b"\xa5" * CHUNK
    stream = await open_stream()
    await stream.send_all(b"bulk")
    start = time.perf_counter()
    for _ in range(megabytes * 1024 * 1024 // CHUNK):
        await stream.send_all(block)
    await stream.send_eof()
    assert await receive_exactly(stream, 2) == b"ok"
    elapsed = time.perf_counter() - start
    await stream.aclose()

    stream = await open_stream()
    await stream.send_all(b"echo")
    request = b"r" * MESSAGE
    samples = []
    for _ in range(round_trips):
        t0 = time.perf_counter()
        await stream.send_all(request)
        await receive_exactly(stream, MESSAGE)
        samples.append((time.perf_counter() - t0) * 1e6)
    await stream.send_eof()
    await stream.aclose()
    samples.sort()
    return Figures(
        mb_per_s=megabytes / elapsed,
        p50_us=exact_percentile(samples, 50),
        p99_us=exact_percentile(samples, 99),
    )


async def run(megabytes: int, round_trips: int) -> tuple[Figures, Figures]:
    with tempfile.TemporaryDirectory() as tmp:
        authority = CertificateAuthority.load_or_create(Path(tmp) / "ca")
        client_ctx = client_context(mint(authority, CLIENT))
        server_ctx = server_context(mint(authority, SERVER))

    async def hbone_handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        await sink(await acceptor.accept())

    async def on_tls(tcp: trio.SocketStream) -> None:
        await serve_hbone(trio.SSLStream(tcp, server_ctx, server_side=True), hbone_handler)

    async with trio.open_nursery() as nursery:
        tcp_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        hbone_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, sink, tcp_listeners)
        nursery.start_soon(trio.serve_listeners, on_tls, hbone_listeners)
        tcp_port = tcp_listeners[0].socket.getsockname()[1]
        hbone_port = hbone_listeners[0].socket.getsockname()[1]

        async def plain() -> Stream:
            return await trio.open_tcp_stream("127.0.0.1", tcp_port)

        tcp = await trio.open_tcp_stream("127.0.0.1", hbone_port)
        conn = await open_hbone_connection(nursery, tcp, client_ctx, expected={SERVER})

        async def tunnel() -> Stream:
            return await conn.open_tunnel("127.0.0.1:9")

        baseline = await measure(plain, megabytes, round_trips)
        hbone = await measure(tunnel, megabytes, round_trips)
        await conn.aclose()
        nursery.cancel_scope.cancel()
    return baseline, hbone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200, help="bulk transfer size in MiB (default 200)")
    parser.add_argument("--round-trips", type=int, default=2000, help="1 KiB round trips (default 2000)")
    args = parser.parse_args(argv)
    baseline, hbone = trio.run(run, args.megabytes, args.round_trips)
    print(f"{'':14}{'MB/s':>10}{'p50 us':>10}{'p99 us':>10}")
    for name, f in (("plain TCP", baseline), ("HBONE tunnel", hbone)):
        print(f"{name:14}{f.mb_per_s:10.0f}{f.p50_us:10.0f}{f.p99_us:10.0f}")
    print(
        f"HBONE: {hbone.mb_per_s / baseline.mb_per_s:.0%} of plain TCP throughput; "
        f"added latency p50 {hbone.p50_us - baseline.p50_us:.0f} us, p99 {hbone.p99_us - baseline.p99_us:.0f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
