"""Multiplexed HTTP/2 toward endpoints against a real h2 server on loopback: many streams on one
connection, the peer's stream limit, flow control both ways, a reset that ends one stream only, GOAWAY,
and trailers both ways."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
from hyperframe.frame import GoAwayFrame

from mesh.proto import discovery_pb2 as pb
from tests.unit.waypoint.waypoint_harness import NS, fq, request, running_proxy, table, workload
from waypoint.errors import UpstreamReset
from waypoint.http.exchange import iterate
from waypoint.http.http2_client import Http2Client, Http2Stream, NotProcessed
from waypoint.l7.model import Endpoint, RequestHead
from waypoint.upstream.pool import ConnectionPool, TcpUpstream


@dataclass
class _Req:
    conn: h2.connection.H2Connection
    stream_id: int
    path: str
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: trio.Event = field(default_factory=trio.Event)


@dataclass
class Peer:
    """An HTTP/2 server.  Paths: /echo answers the body back with trailers; /hold waits for `release`;
    /reset resets its stream; /big/N answers N bytes.  Every `goaway_after`-th request it does not
    process: it sends GOAWAY naming the stream before it as the last it processes."""

    max_streams: int | None = None
    goaway_after: int = 0
    close_after_answer: bool = False  # drop the connection (no GOAWAY) once a request is answered
    port: int = 0
    connections: int = 0
    requests: int = 0
    holding: int = 0
    peak: dict[int, int] = field(default_factory=dict)  # per connection: most streams open at once
    release: trio.Event = field(default_factory=trio.Event)
    resets_seen: list[int] = field(default_factory=list)
    got: list[_Req] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        if self.max_streams is not None:
            conn.local_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        conn.initiate_connection()
        lock = trio.Lock()
        windows: dict[int, trio.Event] = {}
        reqs: dict[int, _Req] = {}
        open_streams: set[int] = set()

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        async def wait_window(sid: int) -> None:
            windows[sid] = trio.Event()
            await windows[sid].wait()

        async def send_body(sid: int, data: bytes) -> None:
            while data:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(data))
                if n <= 0:
                    await wait_window(sid)
                    continue
                conn.send_data(sid, data[:n])
                data = data[n:]
                await flush()

        async def handle(r: _Req) -> None:
            sid = r.stream_id
            open_streams.add(sid)
            self.peak[number] = max(self.peak.get(number, 0), len(open_streams))
            try:
                if r.path == "/hold":
                    self.holding += 1
                    await self.release.wait()
                    await r.ended.wait()
                    conn.send_headers(sid, [(":status", "200")], end_stream=False)
                    await send_body(sid, b"held")
                    conn.end_stream(sid)
                elif r.path == "/reset":
                    conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                elif r.path.startswith("/big/"):
                    await r.ended.wait()
                    conn.send_headers(sid, [(":status", "200")])
                    await send_body(sid, b"b" * int(r.path.split("/")[2]))
                    conn.end_stream(sid)
                else:
                    await r.ended.wait()
                    conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                    await send_body(sid, bytes(r.body))
                    conn.send_headers(sid, [("grpc-status", "7"), ("grpc-message", "echoed"),
                                            ("x-request-trailer", r.trailers.get("x-sum", ""))], end_stream=True)
                await flush()
                if self.close_after_answer:
                    await stream.aclose()
            finally:
                open_streams.discard(sid)

        try:
            async with trio.open_nursery() as nursery:
                await flush()
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.ClosedResourceError:  # a handler dropped the connection
                        break
                    if not data:
                        break
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            hdrs = {_s(k): _s(v) for k, v in ev.headers or []}
                            r = _Req(conn, ev.stream_id or 0, hdrs[":path"], hdrs)
                            reqs[ev.stream_id] = r
                            self.got.append(r)
                            self.requests += 1
                            if ev.stream_ended is not None:
                                r.ended.set()
                            if self.goaway_after and self.requests % self.goaway_after == 0:
                                # a graceful GOAWAY, written by hand: h2 would stop serving the others too
                                goaway = GoAwayFrame(0, last_stream_id=ev.stream_id - 2, error_code=0)
                                await flush()
                                async with lock:
                                    await stream.send_all(goaway.serialize())
                            else:
                                nursery.start_soon(handle, r)
                        elif isinstance(ev, h2.events.DataReceived):
                            reqs[ev.stream_id].body += ev.data or b""
                            conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                        elif isinstance(ev, h2.events.TrailersReceived):
                            reqs[ev.stream_id or 0].trailers = {_s(k): _s(v) for k, v in ev.headers or []}
                        elif isinstance(ev, h2.events.StreamEnded):
                            reqs[ev.stream_id].ended.set()
                        elif isinstance(ev, h2.events.StreamReset):
                            self.resets_seen.append(ev.stream_id or 0)
                        elif isinstance(ev, h2.events.WindowUpdated):
                            for sid in ([ev.stream_id] if ev.stream_id else list(windows)):
                                if sid in windows:
                                    windows.pop(sid).set()
                    await flush()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
            pass
        finally:
            await stream.aclose()


def _s(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def start_peer(nursery: trio.Nursery, **kw: object) -> Peer:
    peer = Peer(**kw)  # type: ignore[arg-type]
    listeners = await nursery.start(partial(trio.serve_tcp, peer.serve, 0, host="127.0.0.1"))
    peer.port = listeners[0].socket.getsockname()[1]
    return peer


def head(path: str, *headers: tuple[str, str]) -> RequestHead:
    return RequestHead("POST", path, "svc:80", headers, protocol="HTTP/2")


async def call(pool: ConnectionPool, ep: Endpoint, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn, _ = await pool.acquire(ep, "HTTP/2", 5.0)
    try:
        await conn.send_request(head(path), iterate(body))
        got = await conn.receive_response()
        data = b"".join([c async for c in conn.response_body()])
        return got.status, data
    finally:
        await pool.release(ep, "HTTP/2", conn)


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(20):
            await main()
    trio.run(bounded)


def test_concurrent_requests_share_one_connection() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n)
            pool = ConnectionPool(TcpUpstream())
            ep = Endpoint("127.0.0.1", peer.port)
            results: list[tuple[int, bytes]] = []

            async def one() -> None:
                results.append(await call(pool, ep, "/hold"))

            async with trio.open_nursery() as calls:
                for _ in range(30):
                    calls.start_soon(one)
                while peer.holding < 30:  # all 30 open at the server at once
                    await trio.sleep(0.01)
                peer.release.set()
            assert results == [(200, b"held")] * 30
            assert peer.connections == 1 and peer.peak[1] == 30 and pool.shared_count() == 1
            await pool.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_the_peers_stream_limit_opens_more_connections() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n, max_streams=4)
            pool = ConnectionPool(TcpUpstream())
            ep = Endpoint("127.0.0.1", peer.port)
            async with trio.open_nursery() as calls:
                for _ in range(10):
                    calls.start_soon(call, pool, ep, "/hold")
                while peer.holding < 10:
                    await trio.sleep(0.01)
                peer.release.set()
            assert peer.connections == 3  # 4 + 4 + 2
            assert all(p <= 4 for p in peer.peak.values()), peer.peak
            await pool.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_a_reset_ends_only_its_own_stream() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n)
            pool = ConnectionPool(TcpUpstream())
            ep = Endpoint("127.0.0.1", peer.port)
            held: list[tuple[int, bytes]] = []
            async with trio.open_nursery() as calls:
                calls.start_soon(lambda: _append(held, call(pool, ep, "/hold")))
                while peer.holding < 1:
                    await trio.sleep(0.01)
                with pytest.raises(UpstreamReset) as info:  # the endpoint resets one stream
                    await call(pool, ep, "/reset")
                assert info.value.flag == "UR"
                # the waypoint gives up one stream before its answer: RST_STREAM for it alone
                conn, _ = await pool.acquire(ep, "HTTP/2", 5.0)
                assert isinstance(conn, Http2Stream)
                await conn.send_head(head("/hold"))
                while peer.holding < 2:
                    await trio.sleep(0.01)
                await conn.aclose()
                while not peer.resets_seen:
                    await trio.sleep(0.01)
                assert await call(pool, ep, "/echo", b"still here") == (200, b"still here")
                peer.release.set()
            assert held == [(200, b"held")] and peer.connections == 1
            await pool.aclose()
            n.cancel_scope.cancel()
    run(main)


async def _append(out: list[tuple[int, bytes]], aw: Awaitable[tuple[int, bytes]]) -> None:
    out.append(await aw)


def test_goaway_fails_unprocessed_streams_and_new_requests_use_a_new_connection() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n, goaway_after=2)
            pool = ConnectionPool(TcpUpstream())
            ep = Endpoint("127.0.0.1", peer.port)
            first: list[tuple[int, bytes]] = []
            errors: list[Exception] = []

            async def second() -> None:
                try:
                    await call(pool, ep, "/hold")
                except NotProcessed as exc:
                    errors.append(exc)

            async with trio.open_nursery() as calls:
                calls.start_soon(lambda: _append(first, call(pool, ep, "/hold")))
                while peer.holding < 1:
                    await trio.sleep(0.01)
                calls.start_soon(second)  # GOAWAY names the first stream as the last processed
                while not errors:
                    await trio.sleep(0.01)
                peer.release.set()
            assert first == [(200, b"held")]  # processed streams finish after GOAWAY
            assert "GOAWAY" in str(errors[0])
            assert await call(pool, ep, "/echo", b"again") == (200, b"again")
            assert peer.connections == 2
            await pool.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_flow_control_both_ways_and_a_stalled_reader_stalls_only_its_stream() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n)
            pool = ConnectionPool(TcpUpstream())
            ep = Endpoint("127.0.0.1", peer.port)
            big = bytes(random.Random(1).randrange(256) for _ in range(300_000))
            assert await call(pool, ep, "/echo", big) == (200, big)  # > every initial window, both ways
            stalled, _ = await pool.acquire(ep, "HTTP/2", 5.0)
            await stalled.send_request(head("/big/200000"), iterate(b""))
            assert (await stalled.receive_response()).status == 200  # its body is never read here
            for _ in range(3):
                assert await call(pool, ep, "/big/150000") == (200, b"b" * 150_000)
            body = b"".join([c async for c in stalled.response_body()])
            assert len(body) == 200_000
            await pool.release(ep, "HTTP/2", stalled)
            assert peer.connections == 1
            await pool.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_trailers_pass_both_ways() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n)
            client = Http2Client(await trio.open_tcp_stream("127.0.0.1", peer.port))
            await client.send_request(head("/echo", ("te", "trailers")), iterate(b"abc"), (("x-sum", "42"),))
            got = await client.receive_response()
            assert got.status == 200 and b"".join([c async for c in client.response_body()]) == b"abc"
            assert dict(client.response_trailers) == {"grpc-status": "7", "grpc-message": "echoed",
                                                      "x-request-trailer": "42"}
            assert peer.got[0].headers.get("te") == "trailers"
            await client.aclose()
            n.cancel_scope.cancel()
    run(main)


# ---- through the waypoint ----------------------------------------------------------------------------

def grpc_service(name: str, vip: str, port: int = 9080) -> pb.Service:
    return pb.Service(name=name, namespace=NS, hostname=fq(name), vips=[vip],
                      ports=[pb.ServicePort(service_port=port, target_port=port, name="grpc")])


async def _via_waypoint(client: Http2Client, path: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    await client.send_request(RequestHead("POST", path, "echo:9080", (("te", "trailers"),), protocol="HTTP/2"),
                              iterate(body), (("x-sum", "9"),))
    got = await client.receive_response()
    data = b"".join([c async for c in client.response_body()])
    return got.status, data, dict(client.response_trailers)


def test_waypoint_resends_a_request_goaway_left_unprocessed_and_relays_trailers() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n, goaway_after=2)
            tbl = table([grpc_service("echo", "10.96.0.20")], [workload("echo-v1", "echo", "v1", peer.port)], [])
            async with running_proxy(tbl, destination="10.96.0.20:9080") as (proxy, front, _log, _n):
                client = Http2Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                assert await _via_waypoint(client, "/echo", b"one") == (
                    200, b"one", {"grpc-status": "7", "grpc-message": "echoed", "x-request-trailer": "9"})
                # the second request on the same upstream connection is refused by GOAWAY and sent again
                assert (await _via_waypoint(client, "/echo", b"two"))[:2] == (200, b"two")
                assert peer.connections == 2 and proxy.pool.opened == 2 and peer.requests == 3
                await client.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_waypoint_resends_a_request_on_a_pooled_connection_found_dead() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n, close_after_answer=True)
            tbl = table([grpc_service("echo", "10.96.0.20")], [workload("echo-v1", "echo", "v1", peer.port)], [])
            async with running_proxy(tbl, destination="10.96.0.20:9080") as (proxy, front, _log, _n):
                client = Http2Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                for body in (b"one", b"two", b"three"):
                    assert (await _via_waypoint(client, "/echo", body))[:2] == (200, body)
                assert peer.connections == 3 and proxy.pool.opened == 3
                await client.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_an_endpoint_that_does_not_speak_http2_gets_a_clear_error() -> None:
    async def http1_answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await trio.sleep(5)  # and keeps the connection open

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(partial(trio.serve_tcp, http1_answer, 0, host="127.0.0.1"))
            ep = Endpoint("127.0.0.1", listeners[0].socket.getsockname()[1])
            pool = ConnectionPool(TcpUpstream())
            with pytest.raises(UpstreamReset) as info:
                await pool.acquire(ep, "HTTP/2", 5.0)
            assert "does it speak HTTP/2 (prior knowledge) on this port?" in str(info.value)
            assert "broke the HTTP/2 protocol" in str(info.value) and pool.shared_count() == 0
            n.cancel_scope.cancel()
    run(main)


def test_an_http1_client_reaches_an_http2_endpoint() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            peer = await start_peer(n)
            tbl = table([grpc_service("echo", "10.96.0.20")], [workload("echo-v1", "echo", "v1", peer.port)], [])
            async with running_proxy(tbl, destination="10.96.0.20:9080") as (_proxy, front, _log, _n):
                for body in (b"", b"x" * 200_000):  # no body; a body over the retry buffer, streamed once
                    got, data = await request(front.port, "/echo", method="POST", body=body)
                    assert got.status == 200 and data == body  # (the trailers have no place in HTTP/1.1)
                assert peer.got[1].headers.get("content-length") == "200000"
            n.cancel_scope.cancel()
    run(main)
