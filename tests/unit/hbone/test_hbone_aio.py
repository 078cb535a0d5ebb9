"""HBONE on the engine (`mesh.hbone.aio`, `aiopool`, `splice`, `engine`): real TLS on loopback, uvloop.

The engine's client and server against each other, and each against the trio side (which the waypoint
uses), so both transports keep speaking the same protocol."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import uvloop
from hbone_helpers import SLEEP, WEB, Mint, mint_from

from ca.authority import CertificateAuthority
from mesh.hbone.aio import WRITE_AT_ONCE, AioAcceptor, AioClientConnection, AioHbone, TunnelEnd, serve_tls
from mesh.hbone.aiopool import AioPool, sock_connect, tcp_connect
from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.hbone.engine import Engine
from mesh.hbone.errors import PoolConnectError, TunnelRejected, TunnelTimeout
from mesh.hbone.pool import PoolKey
from mesh.hbone.server import InboundRequest, ListenerGate
from mesh.hbone.splice import PlainEnd, Splice, open_end, relay_ends
from mesh.secrets.tls import client_context, server_context


@pytest.fixture(scope="module")
def mint(tmp_path_factory: pytest.TempPathFactory) -> Mint:
    path: Path = tmp_path_factory.mktemp("aio-ca")
    return mint_from(CertificateAuthority.load_or_create(path / "ca"))


def run(main: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), timeout)

    uvloop.run(bounded())


Handler = Callable[[InboundRequest, AioAcceptor], Awaitable[None]]


async def server(ctx, handler: Handler, *, gate: ListenerGate | None = None,  # type: ignore[no-untyped-def]
                 config: HboneConfig | None = None) -> tuple[int, socket.socket]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)

            async def serve(sock: socket.socket = sock) -> None:
                with contextlib.suppress(Exception):  # refused: the test looks at the client's side
                    await serve_tls(sock, ctx, handler, trust_domain="cluster.local", gate=gate, config=config)

            loop.create_task(serve())

    loop.add_reader(listener.fileno(), accept)
    return listener.getsockname()[1], listener


async def echo_app() -> tuple[int, asyncio.AbstractServer]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    return app.sockets[0].getsockname()[1], app


async def relay_to_app(request: InboundRequest, acceptor: AioAcceptor) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (request.authority.host, request.authority.port))
    app = await open_end(sock)
    await relay_ends(acceptor.accept(), app)


def test_a_tunnel_relays_both_ways_with_half_close(mint: Mint) -> None:
    async def main() -> None:
        app_port, app = await echo_app()
        port, listener = await server(server_context(mint(WEB)), relay_to_app)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        for _ in range(3):  # pooled: one connection
            plain_port, plain = await client_front(pool, key, f"127.0.0.1:{app_port}")
            reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
            payload = bytes(range(256)) * 4096  # 1 MiB
            writer.write(payload)
            writer.write_eof()
            got = await reader.read(-1)  # until the tunnel's END_STREAM became the FIN
            assert got == payload
            writer.close()
            plain.close()
        assert pool.dialled == 1
        pool.close()
        listener.close()
        app.close()

    run(main)


def client_sends(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each send (`flush_now`) the client's connections make from now on, as whether the core had bytes
    for it; the real send still runs (a spy, over real TLS)."""
    sends: list[bool] = []
    real_send = AioHbone.flush_now

    def counted(self: AioHbone) -> None:
        if isinstance(self, AioClientConnection):
            sends.append(self.proto.has_output())
        real_send(self)

    monkeypatch.setattr(AioHbone, "flush_now", counted)
    return sends


def test_the_frames_of_one_turn_go_out_in_one_write(mint: Mint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two DATA frames and the END_STREAM a tunnel's end is given in one turn of the loop reach the TLS
    transport as one write (a record and a system call); given in two turns, as two.  A bulk write goes
    at once (reading and sending overlap)."""
    sends = client_sends(monkeypatch)

    async def main() -> None:
        app_port, app = await echo_app()
        port, listener = await server(server_context(mint(WEB)), relay_to_app)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        tunnel = await pool.open_tunnel(key, f"127.0.0.1:{app_port}")
        got = bytearray()
        ended = asyncio.Event()

        class Sink:  # the splice's side of the tunnel, as `relay_ends` attaches one
            def data(self, side: int, data: bytes | memoryview) -> None:
                got.extend(data)

            def ended(self, side: int) -> None:
                ended.set()

        tunnel.attach(Sink(), 1)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        sends.clear()
        tunnel.write(b"one ")
        tunnel.write(b"turn")
        await asyncio.sleep(0)  # the turn ends: its send
        assert sum(sends) == 1
        tunnel.write(b", then ")
        await asyncio.sleep(0)
        tunnel.write(b"another")
        tunnel.write_eof()
        await asyncio.sleep(0)
        assert sum(sends) == 3
        await asyncio.wait_for(ended.wait(), 5)
        assert bytes(got) == b"one turn, then another"  # echoed back, then the app's FIN
        bulk = await pool.open_tunnel(key, f"127.0.0.1:{app_port}")
        await asyncio.sleep(0.05)
        sends.clear()
        bulk.write(b"x" * WRITE_AT_ONCE)  # a bulk write: out at once, not held for the turn
        assert sum(sends) == 1
        bulk.close()
        tunnel.close()
        pool.close()
        listener.close()
        app.close()

    run(main)


def test_a_read_with_nothing_to_answer_schedules_no_send(mint: Mint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The echo of what a tunnel sent comes back as DATA the client has nothing to answer (its window is
    far from half used): the client's connection sends nothing then, not even an empty turn's send."""
    sends = client_sends(monkeypatch)

    async def main() -> None:
        app_port, app = await echo_app()
        port, listener = await server(server_context(mint(WEB)), relay_to_app)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        tunnel = await pool.open_tunnel(PoolKey(SLEEP, WEB, ("127.0.0.1", port)), f"127.0.0.1:{app_port}")
        got = bytearray()
        echoed = asyncio.Event()

        class Sink:
            def data(self, side: int, data: bytes | memoryview) -> None:
                got.extend(data)
                if len(got) == 3 * 1024:
                    echoed.set()

            def ended(self, side: int) -> None:
                pass

        tunnel.attach(Sink(), 1)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        sends.clear()
        for _ in range(3):
            tunnel.write(b"x" * 1024)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(echoed.wait(), 5)
        await asyncio.sleep(0.05)
        assert sends == [True, True, True]  # the three writes; the three echoes read made no send
        tunnel.close()
        pool.close()
        listener.close()
        app.close()

    run(main)


def test_a_finished_relay_is_freed_without_the_cyclic_collector(mint: Mint) -> None:
    """Each end refers to its splice; once done, the splice refers to neither end, so a finished relay
    (its splices, tunnel ends, plain ends and their transports) goes when its last reference goes, and
    leaves nothing for a pass of the cyclic collector (a closed tunnel used to leave ~25 objects)."""
    async def main() -> None:
        app_port, app = await echo_app()
        port, listener = await server(server_context(mint(WEB)), relay_to_app)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        plain_port, plain = await client_front(pool, key, f"127.0.0.1:{app_port}")

        async def one() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
            writer.write(b"x" * 100)
            writer.write_eof()
            assert await reader.read(-1) == b"x" * 100
            writer.close()

        await one()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                await one()
            await asyncio.sleep(0.1)  # the relays' last callbacks
            gc.collect()
            ours = [o for o in gc.garbage if isinstance(o, Splice | TunnelEnd | PlainEnd)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert ours == []
        plain.close()
        pool.close()
        listener.close()
        app.close()

    run(main)


async def client_front(pool: AioPool, key: PoolKey, authority: str) -> tuple[int, asyncio.AbstractServer]:
    """A plain listener whose connections are relayed into tunnels (the agent's outbound, reduced)."""

    loop = asyncio.get_running_loop()

    class Accepted(PlainEnd):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            loop.create_task(self.run())

        async def run(self) -> None:
            tunnel = await pool.open_tunnel(key, authority)
            await relay_ends(self, tunnel)

    front = await loop.create_server(Accepted, "127.0.0.1", 0)
    return front.sockets[0].getsockname()[1], front


def test_early_data_reaches_the_app_once_and_a_refused_connect_drops_it(mint: Mint) -> None:
    """The client's bytes go with the CONNECT (`ahead`); the server holds them until it answers: after a
    200 the application gets them once (counted once), after a refusal nothing reaches it and the
    connection's window is given back (a window of 64 KiB, filled by each refused CONNECT)."""
    from mesh.hbone.relay import RelayResult

    async def main() -> None:
        app_port, app = await echo_app()
        app_connections = 0

        async def handler(request: InboundRequest, acceptor: AioAcceptor) -> None:
            nonlocal app_connections
            if request.authority.port != app_port:
                acceptor.reject(401, "denied by policy")
                return
            app_connections += 1
            await relay_to_app(request, acceptor)

        small = HboneConfig(stream_window=65_535, connection_window=65_535)
        port, listener = await server(server_context(mint(WEB)), handler, config=small)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        loop = asyncio.get_running_loop()
        results: list[RelayResult] = []
        authority = {"to": ""}

        class Ahead(PlainEnd):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                loop.create_task(self.run())

            async def run(self) -> None:
                try:
                    tunnel = await pool.open_tunnel(key, authority["to"], ahead=self)
                except TunnelRejected:
                    self.abort()
                    return
                results.append(await relay_ends(self, tunnel))

        front = await loop.create_server(Ahead, "127.0.0.1", 0)
        front_port = front.sockets[0].getsockname()[1]
        authority["to"] = "127.0.0.1:1"  # refused by the handler
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
            writer.write(b"r" * 60_000)
            with contextlib.suppress(ConnectionError):
                assert await reader.read(-1) == b""
            writer.close()
        authority["to"] = f"127.0.0.1:{app_port}"
        payload = bytes(range(256)) * 800
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port)
        writer.write(payload)
        writer.write_eof()
        assert await reader.read(-1) == payload  # a leaked window would stall this
        writer.close()
        for _ in range(50):
            if results:
                break
            await asyncio.sleep(0.01)
        assert app_connections == 1
        assert [(r.a_to_b, r.b_to_a) for r in results] == [(len(payload), len(payload))]
        assert pool.dialled == 1
        front.close()
        pool.close()
        listener.close()
        app.close()

    run(main)


def test_a_rejection_reaches_the_client_with_its_reason(mint: Mint) -> None:
    async def main() -> None:
        async def deny(request: InboundRequest, acceptor: AioAcceptor) -> None:
            acceptor.reject(401, "denied by policy")

        port, listener = await server(server_context(mint(WEB)), deny)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        for _ in range(2):
            with pytest.raises(TunnelRejected) as caught:
                await pool.open_tunnel(key, "10.0.0.1:80")
            assert caught.value.status == 401 and caught.value.reason == "denied by policy"
        assert pool.dialled == 1  # the connection is fine for the next tunnel
        pool.close()
        listener.close()

    run(main)


def test_the_wrong_server_identity_is_refused(mint: Mint) -> None:
    async def main() -> None:
        port, listener = await server(server_context(mint(SLEEP)), relay_to_app)  # not WEB
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        with pytest.raises(PoolConnectError, match="expected"):
            await pool.open_tunnel(PoolKey(SLEEP, WEB, ("127.0.0.1", port)), "10.0.0.1:80")
        listener.close()

    run(main)


def test_a_connect_without_answer_times_out(mint: Mint) -> None:
    async def main() -> None:
        async def never(request: InboundRequest, acceptor: AioAcceptor) -> None:
            await asyncio.sleep(30)

        port, listener = await server(server_context(mint(WEB)), never)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)), config=HboneConfig(answer_timeout=0.3))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        with pytest.raises(TunnelTimeout):
            await pool.open_tunnel(key, "10.0.0.1:80")
        assert pool.connections(key)[0].active_tunnels == 0  # reset, not left pending
        pool.close()
        listener.close()

    run(main)


def test_a_listener_over_its_cap_closes_new_connections(mint: Mint) -> None:
    async def main() -> None:
        gate = ListenerGate(ListenerLimits(max_connections=1, max_handshakes=4))
        port, listener = await server(server_context(mint(WEB)), relay_to_app, gate=gate)
        held = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(1), 2) == b""
        assert gate.refused == 1
        held[1].close()
        listener.close()

    run(main)


def test_the_engine_bridges_trio_and_its_loop() -> None:
    async def main() -> None:
        engine = Engine()
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)

            async def on_engine(x: int) -> int:
                assert asyncio.get_running_loop() is engine.loop
                got = await engine.from_trio(trio_side, x)  # and back into trio
                return got + 1

            async def trio_side(x: int) -> int:
                await trio.sleep(0)
                return x * 2

            assert await engine.call(on_engine, 20) == 41
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_tunnel_never_waits_for_a_slow_pre_warm(mint: Mint) -> None:
    """A pre-warm whose dial hangs (the peer's pod still being enrolled: SYNs retransmitted for seconds)
    does not hold up the first tunnel, which dials a connection of its own."""
    async def main() -> None:
        app_port, app = await echo_app()
        port, listener = await server(server_context(mint(WEB)), relay_to_app)
        stalled = asyncio.Event()
        dials = 0

        async def connect(key: PoolKey) -> socket.socket:
            nonlocal dials
            dials += 1
            if dials == 1:  # the pre-warm's dial: stuck until the test lets it go
                stalled.set()
                await asyncio.Event().wait()
            return await tcp_connect(key)

        pool = AioPool(connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        warming = asyncio.ensure_future(pool.warm(key))
        await stalled.wait()
        assert await pool.warm(key) is False  # one pre-warm of a key at a time
        plain_port, plain = await client_front(pool, key, f"127.0.0.1:{app_port}")
        reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
        writer.write(b"ping")
        writer.write_eof()
        assert await reader.read(-1) == b"ping"  # answered while the pre-warm still hangs
        assert not warming.done() and dials == 2
        warming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warming
        writer.close()
        plain.close()
        pool.close()
        listener.close()
        app.close()

    run(main)


def test_warm_dials_ahead_once_and_the_first_tunnel_uses_it(mint: Mint) -> None:
    async def main() -> None:
        app_port, app = await echo_app()
        port, listener = await server(server_context(mint(WEB)), relay_to_app)
        pool = AioPool(tcp_connect, lambda _: client_context(mint(SLEEP)))
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
        assert await pool.warm(key) is True
        assert pool.dialled == 1 and len(pool.connections(key)) == 1
        assert await pool.warm(key) is False  # one is there: nothing more
        plain_port, plain = await client_front(pool, key, f"127.0.0.1:{app_port}")
        reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
        writer.write(b"ping")
        writer.write_eof()
        assert await reader.read(-1) == b"ping"
        writer.close()
        plain.close()
        assert pool.dialled == 1  # the first tunnel went on the pre-warmed connection
        with pytest.raises(PoolConnectError):  # nobody listens there: said as a tunnel would say it
            await pool.warm(PoolKey(SLEEP, WEB, ("127.0.0.1", 1)))
        pool.close()
        listener.close()
        app.close()

    run(main)



def test_sock_connect_connects_refuses_and_gives_up_cleanly() -> None:
    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sock = socket.socket()
        sock.setblocking(False)
        await sock_connect(sock, ("127.0.0.1", port))  # connected: the listener has it queued
        accepted, peer = listener.accept()
        assert peer == sock.getsockname()
        accepted.close()
        sock.close()

        # A connect to this host is done within the call: it returns without a turn of the loop.
        turned = []
        asyncio.get_running_loop().call_soon(turned.append, True)
        local = socket.socket()
        local.setblocking(False)
        await sock_connect(local, ("127.0.0.1", port))
        assert turned == [] and local.getpeername() == ("127.0.0.1", port)
        listener.accept()[0].close()
        local.close()

        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
        closed.close()
        refused = socket.socket()
        refused.setblocking(False)
        with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{free}"):
            await sock_connect(refused, ("127.0.0.1", free))
        refused.close()

        # A wait that is cancelled leaves the loop without a writer on the socket (it is the caller's to
        # close): a listener whose accept queue is full drops the next SYN, so that connect hangs.
        full = socket.create_server(("127.0.0.1", 0), backlog=0)
        queued = []
        loop = asyncio.get_running_loop()
        for _ in range(8):
            waiting = socket.socket()
            waiting.setblocking(False)
            queued.append(waiting)
            try:
                async with asyncio.timeout(0.2):
                    await sock_connect(waiting, full.getsockname())
            except TimeoutError:
                break
        else:
            pytest.fail("the full accept queue took every connection")
        assert not loop.remove_writer(waiting.fileno())
        for each in queued:
            each.close()
        full.close()
        listener.close()

    run(main)
