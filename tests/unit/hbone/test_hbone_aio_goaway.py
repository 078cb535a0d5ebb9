"""A draining HBONE server (a node agent being replaced) loses no tunnel: a CONNECT that crossed its GOAWAY
on the wire is refused unprocessed (REFUSED_STREAM), and the engine's pool opens it on a new connection.
Real TLS over loopback, on the engine's kind of loop (asyncio)."""

from __future__ import annotations

import asyncio
import socket

from hbone_helpers import SLEEP, WEB, Mint

from mesh.hbone.aio import AioAcceptor, AioServerConnection, serve_tls
from mesh.hbone.aiopool import AioPool, tcp_connect
from mesh.hbone.pool import PoolKey
from mesh.hbone.server import InboundRequest
from mesh.secrets.tls import client_context, server_context


def test_a_connect_that_crosses_the_servers_goaway_is_opened_on_a_new_connection(mint: Mint) -> None:
    server_ctx, client_ctx = server_context(mint(WEB)), client_context(mint(SLEEP))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        served: list[AioServerConnection] = []
        taken: list[str] = []

        async def handler(request: InboundRequest, acceptor: AioAcceptor) -> None:
            taken.append(str(request.authority))
            acceptor.accept()

        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)

        async def accept_loop() -> None:
            while True:
                sock, _ = await loop.sock_accept(listener)
                served.append(await serve_tls(sock, server_ctx, handler, trust_domain="cluster.local"))

        acceptor_task = loop.create_task(accept_loop())
        pool = AioPool(tcp_connect, lambda _: client_ctx)
        key = PoolKey(SLEEP, WEB, listener.getsockname())
        try:
            first = await pool.open_tunnel(key, "10.0.0.1:80")
            (conn,) = pool.connections(key)
            # The client does not read the server's GOAWAY before it sends its next CONNECT on that
            # connection: the two cross on the wire.
            conn.transport.pause_reading()  # type: ignore[union-attr]
            served[0].goaway()
            await asyncio.sleep(0.05)
            loop.call_later(0.1, conn.transport.resume_reading)  # type: ignore[union-attr]
            second = await pool.open_tunnel(key, "10.0.0.2:80")
            assert pool.dialled == 2 and second.conn is not conn
            assert taken == ["10.0.0.1:80", "10.0.0.2:80"]  # the refused CONNECT was not processed
            assert not conn.can_open_tunnel() and not first.closed  # the draining one still carries its tunnel
            first.abort()
            second.abort()
        finally:
            pool.close()
            acceptor_task.cancel()
            listener.close()

    asyncio.run(main())
