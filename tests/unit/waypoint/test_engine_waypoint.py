"""The waypoint's data path on the engine (`waypoint.engine`) end to end over real HBONE: a source agent's
HBONE client (mutual TLS, HTTP/2 CONNECT) -> the engine's inbound (15008) -> the engine's HTTP/1.1 hop ->
plain TCP backends, and what the hop hands over to trio's proxy (HTTP/2, opaque bytes, upgrades,
streamed bodies).  The waypoint is assembled as the process assembles it (`Waypoint._start_engine`); the
two paths write to separate access logs here, so that each test can tell which path answered."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from test_waypoint_hbone import CLIENT, _http_get, _table, run
from waypoint_harness import start_backend
from waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID, MeshCA, echo, receive_all, running_ca, start_tcp
from waypoint_resources import fq, l7

from mesh.hbone.errors import TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.tls import client_context
from waypoint.app import Waypoint
from waypoint.engine.hop import EngineHop, EngineProxy
from waypoint.engine.inbound import EngineInbound
from waypoint.http.exchange import iterate
from waypoint.http.http2_client import Http2Client
from waypoint.l7.model import RequestHead
from waypoint.options import Options

pytestmark = pytest.mark.timeout(60)

REVIEWS = "10.96.0.11:9080"  # the service VIP the tunnels are addressed to
ECHO = "10.96.0.12:7000"


@pytest.fixture
def ca(tmp_path: Path) -> MeshCA:
    with running_ca(tmp_path) as c:
        yield c  # type: ignore[misc]


@dataclass
class Running:
    """A waypoint on the engine, and a source agent's HBONE client presenting `sleep`'s certificate."""

    waypoint: Waypoint
    port: int
    agent: HbonePool
    client_hash: str  # SHA-256 of the client's leaf certificate (what XFCC's Hash= carries)
    engine_log: list[str] = field(default_factory=list)  # access-log lines written by the engine's hop
    trio_log: list[str] = field(default_factory=list)  # ... and by trio's proxy (what was handed over)

    @property
    def hop(self) -> EngineHop:
        assert self.waypoint.hop is not None
        return self.waypoint.hop

    @property
    def engine_proxy(self) -> EngineProxy:
        assert self.waypoint.engine_proxy is not None
        return self.waypoint.engine_proxy

    async def tunnel(self, authority: str = REVIEWS) -> Any:
        key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", self.port))
        return await self.agent.open_tunnel(key, authority, request_headers(forwarded_for=CLIENT))


@asynccontextmanager
async def engine_waypoint(ca: MeshCA, tmp: Path, backends: dict[str, int], echo_port: int = 7000,
                          configs: list[pb.L7Config] | None = None) -> AsyncIterator[Running]:
    """`Waypoint` with its default engine, its parts started as `Waypoint.run` starts them (no discovery:
    the table is given), its HBONE inbound on an ephemeral port."""
    opts = Options(control_plane="127.0.0.1:1", root_cert=tmp / "root.pem", token_file=tmp / "token",
                   name="waypoint", namespace="bookinfo", node="node-1", listen="127.0.0.1:0", connect_timeout=5)
    certs, client = ca.secret_manager(WAYPOINT_ID)
    svid = ca.mint(SLEEP_ID)
    ctx = client_context(svid)
    with client:
        async with trio.open_nursery() as n:
            await n.start(certs.run)
            await certs.get(WAYPOINT_ID)
            waypoint = Waypoint(opts, certs)
            assert waypoint.engine is not None and waypoint.engine_proxy is not None  # uvloop: the default
            agent = HbonePool(tcp_connect, lambda _source: ctx, connect_timeout=5)
            running = Running(waypoint, 0, agent, hashlib.sha256(svid.leaf.der).hexdigest())
            waypoint.proxy.access_log = running.trio_log.append
            waypoint.engine_proxy.access_log = running.engine_log.append  # (list.append: safe from its thread)
            waypoint._use_table(_table(backends, echo_port, configs))
            await waypoint._start_engine(n, waypoint.engine)
            await n.start(waypoint.pool.run)
            await n.start(waypoint.proxy.run)
            await n.start(agent.run)
            # The inbound ends first, while the engine still runs, as it does in the process's drain.
            # (Both cancelled at once, the inbound's last call to the engine may fail: see `serve`.)
            async with trio.open_nursery() as inbound:
                running.port = await inbound.start(waypoint.inbound.serve, "127.0.0.1", 0)
                yield running
                inbound.cancel_scope.cancel()
            n.cancel_scope.cancel()


async def logged(log: list[str], count: int = 1) -> dict[str, Any]:
    """Access-log entry number `count` (1-based), once written (it follows the response)."""
    with trio.fail_after(3):
        while len(log) < count:
            await trio.sleep(0.005)
    return dict(json.loads(log[count - 1]))


class RawResponses:
    """HTTP/1.1 responses read off a stream as bytes, for what a client library would not send (pipelined
    requests, an upgrade): status, headers (lower-case names), body (Content-Length framed)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise AssertionError(f"the stream ended; unread: {self.buf!r}")
        self.buf += data

    async def next(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(timeout):
            while b"\r\n\r\n" not in self.buf:
                await self.more()
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(self.buf) < length:
                await self.more()
            body, self.buf = self.buf[:length], self.buf[length:]
            return status, headers, body

    async def rest(self) -> bytes:
        """What follows, until the stream ends."""
        out, self.buf = self.buf, b""
        return out + await receive_all(self.stream)


@dataclass
class GatedBackend:
    """An HTTP/1.1 server that holds its answer to /held until `gate` is set; it notes every request's path
    as it arrives."""

    gate: trio.Event = field(default_factory=trio.Event)
    arrived: list[str] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    path = event.target.decode()
                    self.arrived.append(path)
                    if path == "/held":
                        await self.gate.wait()
                    body = path.encode()
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", str(len(body)))])) + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage()))
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                else:
                    return


@dataclass
class UpgradeBackend:
    """Answers any request 101 (WebSocket), says "hi" and then echoes what comes; notes the request heads."""

    heads: list[bytes] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        buf = b""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            self.heads.append(head)
            await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                  b"Upgrade: websocket\r\n\r\nhi" + rest)
            await echo(stream)


GET = b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"
UPGRADE = b"GET /chat HTTP/1.1\r\nHost: reviews:9080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
CHUNKED_POST = (b"POST /upload HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")


# ---- served on the engine ------------------------------------------------------------------------------


def test_a_get_in_a_tunnel_is_answered_by_the_engine(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                status, body, headers = await _http_get(await w.tunnel(), "/reviews/0", (("end-user", "jason"),))
                assert status == 200 and headers["x-backend"] == "v1"
                seen = json.loads(body)["headers"]
                assert seen["end-user"] == "jason"
                # The client's certificate as the engine's TLS saw it, and who it is.
                xfcc = seen["x-forwarded-client-cert"]
                assert f"Hash={w.client_hash}" in xfcc and f"URI={SLEEP_ID}" in xfcc and f"By={WAYPOINT_ID}" in xfcc
                entry = await logged(w.engine_log)
                assert entry["response_code"] == 200 and entry["downstream_principal"] == str(SLEEP_ID)
                assert entry["upstream_host"] == f"127.0.0.1:{v1.port}" and entry["response_flags"] == "-"
                assert w.hop.handed == 0 and w.trio_log == []  # the engine's, not handed over
                samples = list(w.waypoint.proxy.metrics.http.requests.collect())[0].samples
                assert any(s.labels["response_code"] == "200" and s.labels["destination_service"] == fq("reviews")
                           and s.labels["source_principal"] == str(SLEEP_ID) and s.value == 1 for s in samples)
            n.cancel_scope.cancel()
    run(main)


# ---- handed over to trio -------------------------------------------------------------------------------


def test_http2_prior_knowledge_is_handed_to_trio(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                client = Http2Client(await w.tunnel())
                try:
                    await client.send_request(RequestHead("GET", "/h2", "reviews:9080", protocol="HTTP/2"), iterate(b""))
                    head = await client.receive_response()
                    body = b"".join([chunk async for chunk in client.response_body()])
                finally:
                    await client.aclose()
                assert head.status == 200 and dict(head.headers)["x-backend"] == "v1"
                assert json.loads(body)["path"] == "/h2"
                # The hand-over carries who the client is.
                assert f"Hash={w.client_hash}" in json.loads(body)["headers"]["x-forwarded-client-cert"]
                entry = await logged(w.trio_log)
                assert entry["protocol"] == "HTTP/2" and entry["response_code"] == 200
                assert entry["downstream_principal"] == str(SLEEP_ID)
                assert w.hop.handed == 1 and w.engine_log == []
                stats = w.waypoint.stats()  # (what the admin endpoint shows an operator)
                assert stats["engine"] == "uvloop" and stats["handed_to_trio"] == 1
            n.cancel_scope.cancel()
    run(main)


def test_a_chunked_post_is_handed_over_whole(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                tunnel = await w.tunnel()
                await tunnel.send_all(CHUNKED_POST)
                status, headers, body = await RawResponses(tunnel).next()
                await tunnel.aclose()
                assert status == 200 and headers["x-backend"] == "v1"
                assert json.loads(body)["method"] == "POST" and json.loads(body)["body"] == "hello world"
                assert v1.seen[-1]["body"] == "hello world"
                assert (await logged(w.trio_log))["response_code"] == 200
                assert w.hop.handed == 1 and w.engine_log == []
            n.cancel_scope.cancel()
    run(main)


def test_a_websocket_upgrade_carries_bytes_both_ways(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            ws = UpgradeBackend()
            port = await start_tcp(n, ws.serve)
            async with engine_waypoint(ca, tmp_path, {"v1": port}) as w:
                tunnel = await w.tunnel()
                await tunnel.send_all(UPGRADE)
                responses = RawResponses(tunnel)
                status, headers, _ = await responses.next()
                assert ws.heads and b"upgrade: websocket" in ws.heads[0].lower()  # the backend was asked
                assert status == 101 and headers.get("upgrade", "").lower() == "websocket"
                with trio.fail_after(2):
                    while len(responses.buf) < 2:
                        await responses.more()
                assert responses.buf == b"hi"  # the backend's first bytes after its 101
                responses.buf = b""
                await tunnel.send_all(b"ping")
                await tunnel.send_eof()
                assert await responses.rest() == b"ping"  # the client's bytes, echoed back
                await tunnel.aclose()
                # relayed on the engine, and recorded once both sides ended, with the bytes each way
                entry = await logged(w.engine_log)
                assert entry["response_code"] == 101 and entry["bytes_received"] == 4 and entry["bytes_sent"] == 6
                assert w.hop.handed == 0 and w.trio_log == []
            n.cancel_scope.cancel()
    run(main)


def test_opaque_bytes_pass_through_on_trio(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            echo_port = await start_tcp(n)
            async with engine_waypoint(ca, tmp_path, {"v1": 1}, echo_port=echo_port) as w:
                tunnel = await w.tunnel(ECHO)
                await tunnel.send_all(b"\x16\x03\x01 not http")
                await tunnel.send_eof()
                assert await receive_all(tunnel) == b"\x16\x03\x01 not http"
                await tunnel.aclose()
                assert w.hop.handed == 1 and w.engine_log == [] and w.trio_log == []
                with trio.fail_after(3):  # counted as trio's passthrough counts it
                    while not [s for m in w.waypoint.registry.collect() for s in m.samples
                               if s.name == "istio_tcp_connections_closed_total" and s.value == 1]:
                        await trio.sleep(0.01)
            n.cancel_scope.cancel()
    run(main)


def test_keep_alive_then_a_request_that_needs_the_hand_over(ca: MeshCA, tmp_path: Path) -> None:
    """A GET on the engine, then (after its answer, on the same tunnel) a chunked POST: the connection
    goes to trio from the POST on, and both are answered."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                tunnel = await w.tunnel()
                responses = RawResponses(tunnel)
                await tunnel.send_all(GET)
                status, headers, body = await responses.next()
                assert status == 200 and json.loads(body)["path"] == "/reviews/0"
                assert headers.get("connection") != "close"
                assert (await logged(w.engine_log))["response_code"] == 200 and w.hop.handed == 0
                await tunnel.send_all(CHUNKED_POST)
                status, _, body = await responses.next()
                assert status == 200 and json.loads(body)["body"] == "hello world"
                await tunnel.aclose()
                assert (await logged(w.trio_log))["response_code"] == 200
                assert w.hop.handed == 1 and len(w.engine_log) == 1
                assert [s["path"] for s in v1.seen] == ["/reviews/0", "/upload"]
            n.cancel_scope.cancel()
    run(main)


def test_a_pipelined_request_for_trio_after_a_get_is_answered_503(ca: MeshCA, tmp_path: Path) -> None:
    """A GET and a chunked POST in one write: the POST cannot be handed over exactly (its bytes came in
    the GET's read), so the GET is answered and the POST refused with 503 and `Connection: close`."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                tunnel = await w.tunnel()
                responses = RawResponses(tunnel)
                await tunnel.send_all(GET + CHUNKED_POST)
                status, _, body = await responses.next()
                assert status == 200 and json.loads(body)["path"] == "/reviews/0"
                status, headers, body = await responses.next(timeout=2)
                assert status == 503 and headers["connection"] == "close"
                assert b"send it again on a new connection" in body
                assert await responses.rest() == b""  # and the connection ends
                await tunnel.aclose()
                assert [s["path"] for s in v1.seen] == ["/reviews/0"] and w.hop.handed == 0
            n.cancel_scope.cancel()
    run(main)


def test_two_pipelined_gets_are_both_answered(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                tunnel = await w.tunnel()
                responses = RawResponses(tunnel)
                await tunnel.send_all(GET + GET.replace(b"/reviews/0", b"/reviews/1"))
                assert json.loads((await responses.next())[2])["path"] == "/reviews/0"
                assert json.loads((await responses.next(timeout=2))[2])["path"] == "/reviews/1"
                await tunnel.aclose()
                assert len(w.engine_log) == 2 and w.hop.handed == 0
            n.cancel_scope.cancel()
    run(main)


# ---- the limiter, the drain ----------------------------------------------------------------------------


def test_the_connection_pool_limit_queues_then_overflows_503_uo(ca: MeshCA, tmp_path: Path) -> None:
    """One connection and one pending request allowed: the second request waits for the first's slot and
    is answered after it; a third, with the queue full, gets 503 UO at once."""
    rule = l7("DestinationRule", "reviews", {"host": "reviews", "trafficPolicy": {"connectionPool": {
        "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}}, [fq("reviews")])

    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = GatedBackend()
            port = await start_tcp(n, backend.serve)
            async with engine_waypoint(ca, tmp_path, {"v1": port}, configs=[rule]) as w:
                results: dict[str, tuple[int, bytes]] = {}

                async def get(path: str) -> None:
                    status, body, _ = await _http_get(await w.tunnel(), path)
                    results[path] = (status, body)

                def pending() -> int:
                    return sum(s.limiter.pending for s in list(w.engine_proxy.forwarder.clusters.values()))

                async with trio.open_nursery() as inner:
                    inner.start_soon(get, "/held")
                    with trio.fail_after(5):
                        while backend.arrived != ["/held"]:
                            await trio.sleep(0.01)
                    inner.start_soon(get, "/queued")
                    with trio.fail_after(5):
                        while pending() != 1:
                            await trio.sleep(0.01)
                    status, body, _ = await _http_get(await w.tunnel(), "/overflow")
                    assert status == 503 and b"overflow" in body
                    assert backend.arrived == ["/held"]  # the queued one is still waiting
                    backend.gate.set()
                assert results == {"/held": (200, b"/held"), "/queued": (200, b"/queued")}
                assert backend.arrived == ["/held", "/queued"]
                await logged(w.engine_log, 3)
                flags = {json.loads(line)["path"]: json.loads(line)["response_flags"] for line in w.engine_log}
                assert flags == {"/held": "-", "/queued": "-", "/overflow": "UO"}
                assert pending() == 0 and w.hop.handed == 0
            n.cancel_scope.cancel()
    run(main)


def test_after_drain_the_next_response_says_connection_close(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                tunnel = await w.tunnel()
                responses = RawResponses(tunnel)
                await tunnel.send_all(GET)
                status, headers, _ = await responses.next()
                assert status == 200 and headers.get("connection") != "close"
                engine = w.waypoint.engine
                assert engine is not None
                engine.call_soon(w.hop.drain)
                with trio.fail_after(2):
                    while not w.hop.draining:
                        await trio.sleep(0.005)
                await tunnel.send_all(GET)
                status, headers, _ = await responses.next()
                assert status == 200 and headers["connection"] == "close"
                assert await responses.rest() == b""  # the connection ends after it
                await tunnel.aclose()
                assert w.hop.handed == 0 and len(w.engine_log) == 2
            n.cancel_scope.cancel()
    run(main)


def test_a_route_table_update_retires_the_upstream_connections_it_changes(ca: MeshCA, tmp_path: Path) -> None:
    """The engine's keep-alive connection to the endpoint is reused across tunnels; a table that changes
    nothing keeps it; one that changes the service's DestinationRule retires it (the next request dials)."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                async def get() -> None:
                    status, _, headers = await _http_get(await w.tunnel(), "/reviews/0")
                    assert status == 200 and headers["x-backend"] == "v1"

                async def use(configs: list[pb.L7Config]) -> None:
                    table = _table({"v1": v1.port}, configs=configs)
                    w.waypoint._use_table(table)  # (trio's proxy now, the engine's on the engine)
                    with trio.fail_after(2):
                        while w.engine_proxy.table is not table:
                            await trio.sleep(0.005)

                await get()
                await get()
                assert w.hop.pool.opened == 1  # the second request reused the first's connection
                await use([])
                await get()
                assert w.hop.pool.opened == 1  # nothing changed: kept
                dr = {"host": "reviews", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "3s"}}}}
                await use([l7("DestinationRule", "reviews", dr, [fq("reviews")])])
                await get()
                assert w.hop.pool.opened == 2 and len(w.engine_log) == 4 and w.hop.handed == 0
            n.cancel_scope.cancel()
    run(main)


def test_a_tunnel_to_an_unknown_destination_is_refused(ca: MeshCA, tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                with pytest.raises(TunnelRejected) as refused:  # (after the allowance for configuration skew)
                    await w.tunnel("10.96.0.99:9080")
                assert refused.value.status == 400 and "neither a service" in refused.value.reason
                inbound = w.waypoint.inbound
                assert isinstance(inbound, EngineInbound) and inbound.refused == 1
                status, _, _ = await _http_get(await w.tunnel(), "/reviews/0")  # the connection serves on
                assert status == 200 and w.engine_log
            n.cancel_scope.cancel()
    run(main)


# ---- hostile peers -------------------------------------------------------------------------------------


def test_hostile_connections_to_15008_end_alone(ca: MeshCA, tmp_path: Path) -> None:
    """Closed at once, not TLS, reset mid-handshake, no client certificate, garbage after the handshake:
    each ends its own connection only, and the next client is served on the engine."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            v1 = await start_backend(n, "v1")
            async with engine_waypoint(ca, tmp_path, {"v1": v1.port}) as w:
                async def hostile(data: bytes, reset: bool = False) -> None:
                    tcp = await trio.open_tcp_stream("127.0.0.1", w.port)
                    if data:
                        await tcp.send_all(data)
                    if reset:
                        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await tcp.aclose()

                await hostile(b"")
                await hostile(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await hostile(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", reset=True)  # reset mid-ClientHello
                no_cert = ssl.create_default_context()
                no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
                tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", w.port), no_cert)
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await tls.do_handshake()
                    await tls.receive_some(1)
                await trio.aclose_forcefully(tls)
                # A client of the mesh whose TLS is fine but whose HTTP/2 is garbage.
                svid = ca.mint(SLEEP_ID)
                garbage = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", w.port), client_context(svid))
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await garbage.send_all(b"\x00" * 64 + b"not an HTTP/2 preface\r\n\r\n")
                    with trio.fail_after(5):
                        while await garbage.receive_some(65536):
                            pass
                await trio.aclose_forcefully(garbage)
                with trio.fail_after(3):
                    while w.waypoint.inbound.connections:
                        await trio.sleep(0.01)

                status, _, headers = await _http_get(await w.tunnel(), "/reviews/0")
                assert status == 200 and headers["x-backend"] == "v1"
                assert (await logged(w.engine_log))["response_code"] == 200 and w.hop.handed == 0
            n.cancel_scope.cancel()
    run(main)
