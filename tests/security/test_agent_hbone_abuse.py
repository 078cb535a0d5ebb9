"""HTTP/2 abuse on HBONE (15008) and around it: each test is one way a peer could make the agent spend
without bound, and the bound that now holds.

- rapid reset (CVE-2023-44487): a CONNECT's handler is cancelled when the client resets it, and a peer
  that keeps resetting (or sending malformed) streams gets GOAWAY ENHANCE_YOUR_CALM;
- CONTINUATION floods (CVE-2024-27316 family): the header block is bounded in bytes across HEADERS and
  CONTINUATION, not only in frames;
- PING / SETTINGS floods from a peer that does not read: the unsent answers are bounded;
- connections and TLS handshakes in progress are capped per listener;
- the client's CONNECT times out instead of waiting forever;
- a pooled connection is not reused once its certificate (ours or the peer's) was rotated or expired;
- the inbound path closes the application's connection when the CONNECT cannot be accepted.

Sans-IO first (bytes in, events out), then real sockets.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from ca.authority import CertificateAuthority
from mesh.hbone.aio import AioAcceptor, TunnelEnd
from mesh.hbone.client import open_hbone_connection
from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.hbone.errors import HboneError, TunnelReset, TunnelTimeout
from mesh.hbone.events import ConnectionClosed, ConnectRequested
from mesh.hbone.frames import ErrorCode
from mesh.hbone.headers import Authority
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.hbone.server import HboneServerConnection, InboundRequest, ListenerGate, TunnelAcceptor, serve_hbone
from mesh.hbone.sides import HboneServer
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context, server_context
from nodeagent.proxy import inbound
from nodeagent.proxy.admission import InboundConnection
from tests.security import h2_frames as h2f
from tests.security.agent_netns import APP_PORT, CLIENT_IP, POD_IP, Certificates, enrolled_pod

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
WEB = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/web")


def run(fn: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


def fresh_server(config: HboneConfig | None = None) -> HboneServer:
    server = HboneServer(config)
    server.data_to_send()  # our SETTINGS: the peer has read them
    server.receive_data(h2f.PREFACE + h2f.settings())
    server.data_to_send()
    return server


def closed_with(events: list, code: int) -> bool:
    return any(isinstance(e, ConnectionClosed) and e.error_code == code for e in events)


# -- rapid reset ------------------------------------------------------------------------------------------


def test_rapid_reset_gets_goaway_enhance_your_calm() -> None:
    server = fresh_server()
    req = h2f.Requests()
    events: list = []
    for i in range(1000):
        sid = 2 * i + 1
        events += server.receive_data(req.connect(sid) + h2f.rst(sid))
        if closed_with(events, ErrorCode.ENHANCE_YOUR_CALM):
            break
    assert closed_with(events, ErrorCode.ENHANCE_YOUR_CALM), "1000 CONNECTs reset before their answer were taken"
    assert h2f.goaway_code(server.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM
    started = sum(isinstance(e, ConnectRequested) for e in events)
    assert started <= HboneConfig().max_reset_streams + 1


def test_malformed_streams_count_against_the_same_budget() -> None:
    server = fresh_server()
    enc = h2f.Requests().encoder
    events: list = []
    for i in range(1000):
        block = enc.encode([(":method", "GET"), (":authority", "10.0.0.1:80")])  # not a CONNECT: 400
        events += server.receive_data(h2f.frame(h2f.HEADERS, h2f.END_HEADERS, 2 * i + 1, block))
    assert closed_with(events, ErrorCode.ENHANCE_YOUR_CALM)


def test_streams_that_were_answered_pay_back_the_resets() -> None:
    # A client that now and then gives up on a CONNECT is not an attacker: each answered stream offsets
    # a reset, so a long-lived pooled connection with occasional resets stays up.
    server = fresh_server()
    req = h2f.Requests()
    events: list = []
    for i in range(0, 2000, 2):
        good, reset = 2 * i + 1, 2 * i + 3
        events += server.receive_data(req.connect(good))
        server.accept(good)
        server.end_stream(good)
        events += server.receive_data(h2f.frame(h2f.DATA, h2f.END_STREAM, good))
        events += server.receive_data(req.connect(reset) + h2f.rst(reset))
        server.data_to_send()
    assert not any(isinstance(e, ConnectionClosed) for e in events)


# -- CONTINUATION flood -----------------------------------------------------------------------------------


def test_continuation_flood_is_bounded_by_header_block_bytes() -> None:
    server = fresh_server()
    limit = HboneConfig().max_header_list_size
    events = server.receive_data(h2f.continuation_flood(1, total=4 * limit, chunk=2048))
    assert closed_with(events, ErrorCode.ENHANCE_YOUR_CALM), \
        "a header block four times the header list limit was buffered, waiting for more CONTINUATION"
    assert h2f.goaway_code(server.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


def test_a_headers_frame_larger_than_a_header_block_is_refused_at_its_frame_header() -> None:
    # Under the 1 MiB frame limit, but 64 times what a header block may be: refused before its payload.
    server = fresh_server()
    header = (1 << 20).to_bytes(3, "big") + bytes([h2f.HEADERS, h2f.END_HEADERS]) + (1).to_bytes(4, "big")
    events = server.receive_data(header)
    assert closed_with(events, ErrorCode.ENHANCE_YOUR_CALM)


# -- PING / SETTINGS floods from a peer that does not read ------------------------------------------------


@pytest.mark.parametrize("flood", ["ping", "settings"])
def test_control_frame_flood_without_reading_is_bounded(flood: str) -> None:
    server = fresh_server()
    frame = (lambda n: h2f.ping(n)) if flood == "ping" else (lambda n: h2f.settings())
    events: list = []
    for n in range(20_000):  # never calling data_to_send(): the peer does not read the answers
        events += server.receive_data(frame(n))
        if closed_with(events, ErrorCode.ENHANCE_YOUR_CALM):
            break
    assert closed_with(events, ErrorCode.ENHANCE_YOUR_CALM), "20,000 answers were queued for a peer that reads none"
    assert len(server.data_to_send()) < 64 * 1024


def test_control_frames_of_a_peer_that_reads_are_fine() -> None:
    server = fresh_server()
    events: list = []
    for n in range(5_000):
        events += server.receive_data(h2f.ping(n))
        server.data_to_send()
    assert not any(isinstance(e, ConnectionClosed) for e in events)


def test_ping_flood_over_a_transport_that_is_not_read_closes_the_connection() -> None:
    async def main() -> None:
        client, server = trio.testing.lockstep_stream_pair()  # a write waits until the other side reads

        async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
            await acceptor.reject(404)

        conn = HboneServerConnection(server, handler, peer=None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)

            async def flood() -> None:
                await client.send_all(h2f.PREFACE + h2f.settings())
                n = 0
                while True:
                    await client.send_all(b"".join(h2f.ping(n + i) for i in range(100)))
                    n += 100

            nursery.start_soon(flood)
            with trio.fail_after(10):
                await conn.wait_closed()
            assert "ENHANCE_YOUR_CALM" in (conn.close_reason or "") or "read" in (conn.close_reason or "")
            nursery.cancel_scope.cancel()

    run(main)


# -- real TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    path: Path = tmp_path_factory.mktemp("sec-ca")
    return CertificateAuthority.load_or_create(path / "ca")


def mint(authority: CertificateAuthority, identity: SpiffeId, lifetime: float = 3600) -> Svid:
    key = generate_key()
    issued = authority.sign_workload(key.public_key(), identity, datetime.timedelta(seconds=lifetime))
    return accept_issued(issued.pems, key, identity, load_trust_bundle(authority.root_pem))


async def serve(nursery: trio.Nursery, ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],  # type: ignore[no-untyped-def]
                handler, *, gate: ListenerGate | None = None, config: HboneConfig | None = None) -> int:
    async def on_connection(tcp: trio.SocketStream) -> None:
        context = ctx if isinstance(ctx, ssl.SSLContext) else ctx()
        with contextlib.suppress(HboneError):
            await serve_hbone(trio.SSLStream(tcp, context, server_side=True), handler, config=config, gate=gate)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def test_a_reset_cancels_the_handler_of_a_pending_connect(authority: CertificateAuthority) -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def slow_upstream(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        started.set()
        try:
            await trio.sleep(30)  # an upstream connect that takes its time
        except trio.Cancelled:
            cancelled.set()
            raise
        await acceptor.reject(503, "too late")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_context(mint(authority, WEB)), slow_upstream)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn = await open_hbone_connection(nursery, tcp, client_context(mint(authority, SLEEP)), expected={WEB})
            with trio.move_on_after(5):
                async with trio.open_nursery() as attempt:
                    attempt.start_soon(conn.open_tunnel, "10.244.2.3:8080")
                    await started.wait()
                    attempt.cancel_scope.cancel()  # the client gives up: RST_STREAM(CANCEL)
            with trio.move_on_after(2):
                await cancelled.wait()
            assert cancelled.is_set(), "the handler kept running after its CONNECT was reset"
            nursery.cancel_scope.cancel()

    run(main)


def test_the_client_gives_up_on_a_connect_that_is_never_answered(authority: CertificateAuthority) -> None:
    async def never_answers(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_context(mint(authority, WEB)), never_answers)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn = await open_hbone_connection(nursery, tcp, client_context(mint(authority, SLEEP)), expected={WEB},
                                               config=HboneConfig(answer_timeout=0.5))
            t0 = trio.current_time()
            with pytest.raises(TunnelTimeout) as caught, trio.fail_after(5):
                await conn.open_tunnel("10.244.2.3:8080")
            assert trio.current_time() - t0 < 2
            assert "10.244.2.3:8080" in str(caught.value) and "0.5s" in str(caught.value)
            assert isinstance(caught.value, TimeoutError)
            assert conn.active_tunnels == 0  # the stream was reset, not left pending
            nursery.cancel_scope.cancel()

    run(main)


# -- caps per listener -------------------------------------------------------------------------------------


def client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_tls_handshakes_in_progress_are_capped_per_listener(authority: CertificateAuthority) -> None:
    gate = ListenerGate(ListenerLimits(max_connections=100, max_handshakes=2))

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        await acceptor.reject(404)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_context(mint(authority, WEB)), handler, gate=gate)
            hello = client_hello()
            stalled = []
            for _ in range(5):  # clients that start a handshake and never finish it
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(hello)
                stalled.append(s)
            answered = 0
            for s in stalled:
                with trio.move_on_after(0.5):
                    if await s.receive_some(65536):
                        answered += 1
            assert answered == 2, f"{answered} of 5 stalled handshakes were being served at once"
            for s in stalled:
                await s.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_connections_are_capped_per_listener(authority: CertificateAuthority) -> None:
    gate = ListenerGate(ListenerLimits(max_connections=3, max_handshakes=10))

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        await acceptor.reject(404)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_context(mint(authority, WEB)), handler, gate=gate)
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await trio.sleep(0.2)
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(2), contextlib.suppress(trio.BrokenResourceError):  # a reset: refused too
                assert await extra.receive_some(1) == b"", "a connection over the cap was kept"
            assert gate.refused == 1
            for s in held:
                await s.aclose()
            await trio.sleep(0.2)
            assert gate.connections == 0  # they were counted out as they closed
            nursery.cancel_scope.cancel()

    run(main)


# -- the pool and certificates ------------------------------------------------------------------------------


class Certs:
    """What the pool asks of a certificate store: the current context and certificate per identity."""

    def __init__(self, svid: Svid) -> None:
        self.rotate(svid)

    def rotate(self, svid: Svid) -> None:
        self.svid, self.ctx = svid, client_context(svid)

    def context(self, identity: SpiffeId) -> ssl.SSLContext:
        return self.ctx

    def current(self, identity: SpiffeId) -> Svid:
        return self.svid


async def echo(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
    tunnel = await acceptor.accept()
    while data := await tunnel.receive_some(65536):
        await tunnel.send_all(data)
    await tunnel.send_eof()


def test_a_pooled_connection_is_not_reused_after_the_local_certificate_rotates(
        authority: CertificateAuthority) -> None:
    certs = Certs(mint(authority, SLEEP))
    pool = HbonePool(tcp_connect, certs.context, certificate=certs.current)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_context(mint(authority, WEB)), echo)
            await nursery.start(pool.run)
            key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            assert pool.dialled == 1  # pooled, as it should be
            certs.rotate(mint(authority, SLEEP))  # renewed at half-life: a new serial
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            assert pool.dialled == 2, "a connection made with the previous certificate was reused"
            nursery.cancel_scope.cancel()

    run(main)


def test_a_pooled_connection_is_not_reused_after_the_peers_certificate_expired(
        authority: CertificateAuthority) -> None:
    certs = Certs(mint(authority, SLEEP, lifetime=7200))
    server = [mint(authority, WEB, lifetime=600)]  # the server renews its certificate, as agents do
    now = [0.0]
    pool = HbonePool(tcp_connect, certs.context, certificate=certs.current, clock=lambda: now[0])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, lambda: server_context(server[0]), echo)
            await nursery.start(pool.run)
            key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
            now[0] = server[0].not_after - 60
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            assert pool.dialled == 1
            expired = server[0].not_after
            server[0] = mint(authority, WEB, lifetime=3600)
            now[0] = expired + 1  # the certificate the pooled connection was made with has expired
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            assert pool.dialled == 2, "a connection whose peer certificate expired was reused"
            await (await pool.open_tunnel(key, "10.0.0.1:80")).aclose()
            assert pool.dialled == 2  # and the new one is pooled in its turn
            nursery.cancel_scope.cancel()

    run(main)


# -- inbound: the application's connection when the CONNECT cannot be accepted -----------------------------


class GoneAcceptor(AioAcceptor):
    """A CONNECT whose client reset it while the agent was connecting to the application (the agent's
    inbound path runs on the data path engine: its acceptor is the engine's)."""

    def __init__(self) -> None:
        self.decided = False

    def accept(self) -> TunnelEnd:
        raise TunnelReset("CONNECT 10.250.0.2:8080 was cancelled by the client")

    def reject(self, status: int, reason: str = "") -> None:
        self.decided = True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace")
def test_the_application_connection_is_closed_when_the_connect_cannot_be_accepted() -> None:
    async def main() -> None:
        async with enrolled_pod() as pod:
            conn = InboundConnection(CLIENT_IP, 40000, SLEEP, Authority(POD_IP, APP_PORT))
            with pytest.raises(TunnelReset):
                await pod.ctx.parts.engine.call(inbound._serve, pod.ctx, conn, GoneAcceptor())
            assert len(pod.app_connections) == 1
            with trio.move_on_after(2):
                await pod.app_connections[0].closed.wait()
            assert pod.app_connections[0].closed.is_set(), "the application's connection was left open"

    run(main)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace")
def test_a_pods_15008_caps_its_connections(authority: CertificateAuthority) -> None:
    # The agent's own wiring: each pod's 15008 has its gate, with the limits the agent was started with.
    async def main() -> None:
        limits = ListenerLimits(max_connections=2, max_handshakes=2)
        async with enrolled_pod(certs=Certificates(authority), limits=limits) as pod:
            await pod.ctx.parts.certs.get(pod.ref.identity)
            held = []
            for _ in range(2):
                sock = pod.client_socket()
                await sock.connect((POD_IP, 15008))
                held.append(sock)
            await trio.sleep(0.2)
            extra = pod.client_socket()
            await extra.connect((POD_IP, 15008))
            with trio.fail_after(2), contextlib.suppress(ConnectionResetError):
                assert await extra.recv(1) == b"", "a connection over the pod's cap was kept"
            await trio.sleep(0.1)  # the agent counts it just after closing it
            assert pod.ctx.hbone_gate.refused == 1
            assert pod.refusals("listener_full") == 1
            for sock in (*held, extra):
                sock.close()

    run(main)
