"""The outbound pool over real TLS: sharing, the per-connection stream cap, idle close, failures."""

from __future__ import annotations

import pytest
import trio
from hbone_helpers import INTRUDER, SLEEP, WEB, Mint, echo_handler, hbone_server
from test_hbone_transport import read_all, run

from mesh.hbone.errors import PoolConnectError
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid
from mesh.secrets.tls import client_context, server_context


@pytest.fixture(scope="module")
def svids(mint: Mint) -> dict[SpiffeId, Svid]:
    return {identity: mint(identity) for identity in (SLEEP, WEB, INTRUDER)}


def make_pool(svids: dict[SpiffeId, Svid], **kwargs: float) -> HbonePool:
    return HbonePool(tcp_connect, lambda identity: client_context(svids[identity]), **kwargs)  # type: ignore[arg-type]


def test_200_concurrent_tunnels_use_at_least_two_connections(svids: dict[SpiffeId, Svid]) -> None:
    pool = make_pool(svids)

    async def main() -> None:
        async with (
            hbone_server(server_context(svids[WEB]), echo_handler) as (port, server_conns),
            trio.open_nursery() as nursery,
        ):
            await nursery.start(pool.run)
            key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
            all_open = trio.Event()
            opened = 0
            results: list[bool] = []

            async def one(i: int) -> None:
                nonlocal opened
                tunnel = await pool.open_tunnel(key, f"10.0.0.{i % 250 + 1}:80")
                opened += 1
                if opened == 200:
                    all_open.set()
                await all_open.wait()  # hold every tunnel open at once
                message = f"tunnel {i}".encode()
                await tunnel.send_all(message)
                await tunnel.send_eof()
                results.append(await read_all(tunnel) == message)
                await tunnel.aclose()

            async with trio.open_nursery() as tunnels:
                for i in range(200):
                    tunnels.start_soon(one, i)
            assert results == [True] * 200
            assert pool.dialled >= 2 and len(server_conns) == pool.dialled
            assert all(c.active_tunnels <= 100 for c in pool.connections(key))
            nursery.cancel_scope.cancel()

    run(main, timeout=40)


def test_idle_connections_close(svids: dict[SpiffeId, Svid]) -> None:
    pool = make_pool(svids, idle_timeout=0.3)

    async def main() -> None:
        async with (
            hbone_server(server_context(svids[WEB]), echo_handler) as (port, _),
            trio.open_nursery() as nursery,
        ):
            await nursery.start(pool.run)
            key = PoolKey(SLEEP, WEB, ("127.0.0.1", port))
            tunnel = await pool.open_tunnel(key, "10.0.0.1:80")
            await trio.sleep(0.5)  # busy: a tunnel is open, so it stays
            assert pool.connection_count() == 1
            await tunnel.send_eof()
            await read_all(tunnel)
            await tunnel.aclose()
            start = trio.current_time()
            while pool.connection_count():
                await trio.sleep(0.02)
            assert 0.25 <= trio.current_time() - start < 2
            # The next tunnel dials afresh.
            tunnel = await pool.open_tunnel(key, "10.0.0.1:80")
            assert pool.dialled == 2
            nursery.cancel_scope.cancel()

    run(main)


def test_wrong_server_identity_is_refused(svids: dict[SpiffeId, Svid]) -> None:
    pool = make_pool(svids)

    async def main() -> None:
        async with (
            hbone_server(server_context(svids[INTRUDER]), echo_handler) as (port, _),
            trio.open_nursery() as nursery,
        ):
            await nursery.start(pool.run)
            with pytest.raises(PoolConnectError, match="intruder"):
                await pool.open_tunnel(PoolKey(SLEEP, WEB, ("127.0.0.1", port)), "10.0.0.1:80")
            assert pool.connection_count() == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_unreachable_destination_says_what_to_check(svids: dict[SpiffeId, Svid]) -> None:
    pool = make_pool(svids)

    async def main() -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens on this port now
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with pytest.raises(PoolConnectError, match="node agent running"):
                await pool.open_tunnel(PoolKey(SLEEP, WEB, ("127.0.0.1", port)), "10.0.0.1:80")
            nursery.cancel_scope.cancel()

    run(main)


def test_a_failed_connection_does_not_poison_the_others(svids: dict[SpiffeId, Svid]) -> None:
    pool = make_pool(svids)

    async def main() -> None:
        ctx = server_context(svids[WEB])
        async with (
            hbone_server(ctx, echo_handler) as (port_a, conns_a),
            hbone_server(ctx, echo_handler) as (port_b, _),
            trio.open_nursery() as nursery,
        ):
            await nursery.start(pool.run)
            key_a = PoolKey(SLEEP, WEB, ("127.0.0.1", port_a))
            key_b = PoolKey(SLEEP, WEB, ("127.0.0.1", port_b))
            tunnel_a = await pool.open_tunnel(key_a, "10.0.0.1:80")
            tunnel_b = await pool.open_tunnel(key_b, "10.0.0.2:80")
            # Kill A's connection from the server side.
            await conns_a[0].aclose()
            with pytest.raises(trio.BrokenResourceError):
                await read_all(tunnel_a)
            while pool.connections(key_a):
                await trio.sleep(0.01)
            # B is untouched, and A is dialled again on demand.
            await tunnel_b.send_all(b"b still works")
            await tunnel_b.send_eof()
            assert await read_all(tunnel_b) == b"b still works"
            tunnel_a = await pool.open_tunnel(key_a, "10.0.0.1:80")
            await tunnel_a.send_eof()
            assert await read_all(tunnel_a) == b""
            assert pool.dialled == 3
            nursery.cancel_scope.cancel()

    run(main)
