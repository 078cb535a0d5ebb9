"""HBONE interoperability of the data path engine (the node agent's transport) with real Envoy, both
directions: Envoy originating CONNECT into `aio.serve_tls`, and `AioPool` tunnels through Envoy
terminating CONNECT.  The Envoy configurations are the trio transport's tests' (test_envoy_hbone)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from envoy_helpers import ENVOY_ID, SLEEP, WEB, free_port, run_envoy, write_svid
from test_envoy_hbone import PAYLOAD, envoy_originating_config, envoy_terminating_config

from mesh.hbone.aio import AioAcceptor, serve_tls
from mesh.hbone.aiopool import AioPool, tcp_connect
from mesh.hbone.errors import TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey
from mesh.hbone.server import InboundRequest
from mesh.hbone.splice import PlainEnd, open_end, relay_ends
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid
from mesh.secrets.tls import client_context, server_context

Mint = Callable[[SpiffeId], Svid]


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), 20)

    uvloop.run(bounded())


async def echo_server(port: int) -> asyncio.AbstractServer:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", port)


async def round_trip(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    got = await reader.read(-1)
    writer.close()
    return got


def test_envoy_originates_hbone_into_the_engine(envoy_bin: str, mint: Mint, tmp_path: Path) -> None:
    listen, hbone_port, echo_port = free_port(), free_port(), free_port()
    certs = write_svid(mint(ENVOY_ID), tmp_path / "envoy-certs")
    server_ctx = server_context(mint(WEB))
    seen: list[InboundRequest] = []

    async def handler(request: InboundRequest, acceptor: AioAcceptor) -> None:
        seen.append(request)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", echo_port))
        await relay_ends(acceptor.accept(), await open_end(sock))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo = await echo_server(echo_port)
        listener = socket.create_server(("127.0.0.1", hbone_port))
        listener.setblocking(False)

        def accept() -> None:
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock, _ = listener.accept()
                    sock.setblocking(False)
                    loop.create_task(serve_tls(sock, server_ctx, handler, trust_domain="cluster.local"))

        loop.add_reader(listener.fileno(), accept)
        for _ in range(50):  # Envoy's listener may take a moment
            with contextlib.suppress(OSError):
                assert await round_trip(listen, PAYLOAD) == PAYLOAD
                break
            await asyncio.sleep(0.1)
        loop.remove_reader(listener.fileno())
        listener.close()
        echo.close()

    config = envoy_originating_config(listen, hbone_port, "10.244.1.5:8080", certs)
    with run_envoy(envoy_bin, config, tmp_path / "envoy"):
        run(main)
    assert seen and str(seen[0].authority) == "10.244.1.5:8080"
    assert seen[0].peer == ENVOY_ID
    assert seen[0].baggage == "k8s.namespace.name=default"


@pytest.mark.parametrize("early", [False, True], ids=["after-answer", "early-data"])
def test_engine_tunnels_through_envoy_terminating_connect(envoy_bin: str, mint: Mint, tmp_path: Path,
                                                         early: bool) -> None:
    """Also with the client's first bytes sent before Envoy's 200 (early data, as the node agent sends
    them to another node agent): Envoy holds them until its upstream is connected."""
    listen, echo_port, dead_port = free_port(), free_port(), free_port()
    certs = write_svid(mint(WEB), tmp_path / "envoy-certs")
    client_ctx = client_context(mint(SLEEP))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo = await echo_server(echo_port)
        pool = AioPool(tcp_connect, lambda _: client_ctx)
        key = PoolKey(SLEEP, WEB, ("127.0.0.1", listen))
        headers = request_headers(forwarded_for="10.244.0.7:41234")

        class Front(PlainEnd):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                loop.create_task(self.run())

            async def run(self) -> None:
                ahead = self if early else None
                await relay_ends(self, await pool.open_tunnel(key, f"127.0.0.1:{echo_port}", headers, ahead))

        front = await loop.create_server(Front, "127.0.0.1", 0)
        front_port = front.sockets[0].getsockname()[1]
        results = await asyncio.gather(*(round_trip(front_port, PAYLOAD[: 100_000 * (i + 1)]) for i in range(5)))
        assert results == [PAYLOAD[: 100_000 * (i + 1)] for i in range(5)]
        assert await round_trip(front_port, PAYLOAD) == PAYLOAD
        assert pool.dialled == 1  # every tunnel on the one connection
        with pytest.raises(TunnelRejected) as info:
            await pool.open_tunnel(key, "10.0.0.9:80", headers)  # routed to a cluster nobody listens on
        assert info.value.status == 503
        pool.close()
        front.close()
        echo.close()

    config = envoy_terminating_config(listen, echo_port, dead_port, certs)
    with run_envoy(envoy_bin, config, tmp_path / "envoy"):
        run(main)
