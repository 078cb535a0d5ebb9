"""The trio pool (the waypoint's) loses no tunnel to a draining HBONE server: a CONNECT that crossed the
server's GOAWAY on the wire is refused unprocessed (REFUSED_STREAM) and opened once more on a new
connection, as the engine's pool does (test_hbone_aio_goaway.py).  Real TLS and a real HBONE server over
loopback; the client's socket holds what it reads while paused, so the crossing is certain."""

from __future__ import annotations

import trio
from hbone_helpers import SLEEP, WEB, Mint, hbone_server
from test_hbone_transport import run

from mesh.hbone.errors import TunnelRejected
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.server import InboundRequest, TunnelAcceptor
from mesh.secrets.tls import client_context, server_context


class Pausable(trio.abc.Stream):
    """A TCP stream whose reads can be held back: bytes that arrive while paused are handed on only once
    `resume()` is called (the client has not yet read them), as a transport's `pause_reading` does."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.flowing = trio.Event()
        self.flowing.set()
        self.holding = trio.Event()  # set when bytes arrived while paused
        self.sent_while_paused = 0

    def pause(self) -> None:
        self.flowing = trio.Event()
        self.holding = trio.Event()
        self.sent_while_paused = 0

    def resume(self) -> None:
        self.flowing.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if not self.flowing.is_set():
            self.holding.set()
            await self.flowing.wait()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.flowing.is_set():
            self.sent_while_paused += len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_connect_that_crosses_the_servers_goaway_is_opened_on_a_new_connection(mint: Mint) -> None:
    server_ctx, client_ctx = server_context(mint(WEB)), client_context(mint(SLEEP))

    async def main() -> None:
        taken: list[str] = []
        sockets: list[Pausable] = []

        async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
            taken.append(str(request.authority))
            tunnel = await acceptor.accept()
            await tunnel.receive_some(1)  # held open until the client closes it

        async def connect(key: PoolKey) -> trio.abc.Stream:
            sockets.append(Pausable(await trio.open_tcp_stream(*key.address)))
            return sockets[-1]

        async with hbone_server(server_ctx, handler) as (port, served), trio.open_nursery() as nursery:
            pool = HbonePool(connect, lambda _source: client_ctx, connect_timeout=5)
            await nursery.start(pool.run)
            key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
            first = await pool.open_tunnel(key, "10.0.0.1:80")
            (conn,) = pool.connections(key)
            # The client reads nothing of the server's GOAWAY before it sends its next CONNECT on that
            # connection: the two cross on the wire.
            sockets[0].pause()
            served[0].goaway()
            await sockets[0].holding.wait()  # the GOAWAY is there, unread
            second: list[object] = []

            async def open_second() -> None:
                second.append(await pool.open_tunnel(key, "10.0.0.2:80"))

            nursery.start_soon(open_second)
            while sockets[0].sent_while_paused == 0:  # the CONNECT went out on the draining connection
                await trio.sleep(0.01)
            sockets[0].resume()
            with trio.fail_after(10):
                while not second:
                    await trio.sleep(0.01)
            assert pool.dialled == 2 and len(sockets) == 2
            assert taken == ["10.0.0.1:80", "10.0.0.2:80"]  # the refused CONNECT was not processed
            assert not conn.can_open_tunnel()  # the draining one carries its tunnel, takes no new one
            await first.send_all(b"x")  # ... and that tunnel still works
            await first.aclose()
            nursery.cancel_scope.cancel()

    run(main, timeout=30)


def test_a_connect_the_server_answered_is_not_sent_again(mint: Mint) -> None:
    """A refusal the server made after processing the CONNECT (an answer, not REFUSED_STREAM) stands."""
    server_ctx, client_ctx = server_context(mint(WEB)), client_context(mint(SLEEP))

    async def main() -> None:
        taken: list[str] = []

        async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
            taken.append(str(request.authority))
            await acceptor.reject(503, "upstream unreachable")

        async with hbone_server(server_ctx, handler) as (port, _), trio.open_nursery() as nursery:
            pool = HbonePool(lambda key: trio.open_tcp_stream(*key.address), lambda _source: client_ctx)
            await nursery.start(pool.run)
            try:
                await pool.open_tunnel(PoolKey(SLEEP, WEB, ("127.0.0.1", port)), "10.0.0.3:80")
            except TunnelRejected as exc:
                assert exc.status == 503
            else:
                raise AssertionError("the CONNECT was answered 503")
            assert taken == ["10.0.0.3:80"] and pool.dialled == 1
            nursery.cancel_scope.cancel()

    run(main, timeout=30)
