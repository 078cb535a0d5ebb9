"""HBONE over real TLS 1.3 on 127.0.0.1 with SVIDs from the mesh CA: tunnels, relay, rejects."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
from hbone_helpers import INTRUDER, SLEEP, WEB, Mint, Tls, echo_handler, hbone_server, mint_from, tls_for

from mesh.hbone.client import HboneClientConnection, open_hbone_connection
from mesh.hbone.errors import HandshakeError, TunnelRejected, TunnelReset
from mesh.hbone.headers import request_headers
from mesh.hbone.relay import RelayResult, relay
from mesh.hbone.server import InboundRequest, TunnelAcceptor
from mesh.identity import SpiffeId


@pytest.fixture(scope="module")
def tls(mint: Mint) -> Tls:
    return tls_for(mint(SLEEP), mint(WEB))


def run(fn: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


async def connect(
    nursery: trio.Nursery, port: int, ctx: ssl.SSLContext, expected: SpiffeId = WEB
) -> HboneClientConnection:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    return await open_hbone_connection(nursery, tcp, ctx, expected={expected})


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(1 << 20):
        out += data
    return bytes(out)


def test_tunnel_echo_with_half_close_and_request_info(tls: Tls) -> None:
    seen: list[InboundRequest] = []

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        seen.append(request)
        await echo_handler(request, acceptor)

    async def main() -> None:
        async with hbone_server(tls.server, handler) as (port, _), trio.open_nursery() as nursery:
            conn = await connect(nursery, port, tls.client)
            assert conn.peer == WEB
            headers = request_headers(
                forwarded_for="10.244.0.7:41234", service_host="web.prod", baggage="a=1"
            )
            tunnel = await conn.open_tunnel("10.244.1.5:8080", headers)
            await tunnel.send_all(b"hello through HBONE")
            await tunnel.send_eof()
            assert await read_all(tunnel) == b"hello through HBONE"
            await tunnel.aclose()
            await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main)
    (request,) = seen
    assert request.peer == SLEEP
    assert str(request.authority) == "10.244.1.5:8080"
    assert request.forwarded_for == "10.244.0.7:41234" and request.forwarded_host == "web.prod"
    assert request.baggage == "a=1" and request.peer_address.startswith("127.0.0.1:")


def test_ten_mib_both_ways_intact(tls: Tls) -> None:
    payload = hashlib.sha256(b"seed").digest() * (10 * 1024 * 1024 // 32)

    async def main() -> None:
        async with hbone_server(tls.server, echo_handler) as (port, _), trio.open_nursery() as nursery:
            conn = await connect(nursery, port, tls.client)
            tunnel = await conn.open_tunnel("10.244.1.5:8080")
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await read_all(tunnel))

            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                for i in range(0, len(payload), 300_000):
                    await tunnel.send_all(payload[i : i + 300_000])
                await tunnel.send_eof()
            assert hashlib.sha256(got[0]).digest() == hashlib.sha256(payload).digest()
            assert tunnel.bytes_sent == tunnel.bytes_received == len(payload)
            nursery.cancel_scope.cancel()

    run(main, timeout=40)


@pytest.mark.parametrize(("status", "reason"), [(401, "denied by policy"), (503, "upstream unreachable")])
def test_handler_rejects(tls: Tls, status: int, reason: str) -> None:
    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        await acceptor.reject(status, reason)

    async def main() -> None:
        async with hbone_server(tls.server, handler) as (port, _), trio.open_nursery() as nursery:
            conn = await connect(nursery, port, tls.client)
            with pytest.raises(TunnelRejected) as info:
                await conn.open_tunnel("10.244.1.5:8080")
            assert info.value.status == status and info.value.reason == reason
            assert str(status) in str(info.value)
            assert conn.active_tunnels == 0 and conn.can_open_tunnel()
            nursery.cancel_scope.cancel()

    run(main)


def test_failing_or_silent_handler_answers_503(tls: Tls) -> None:
    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        if request.authority.port == 1:
            raise RuntimeError("boom")
        # port 2: return without answering

    async def main() -> None:
        async with hbone_server(tls.server, handler) as (port, _), trio.open_nursery() as nursery:
            conn = await connect(nursery, port, tls.client)
            for target in ("10.0.0.1:1", "10.0.0.1:2"):
                with pytest.raises(TunnelRejected) as info:
                    await conn.open_tunnel(target)
                assert info.value.status == 503
            nursery.cancel_scope.cancel()

    run(main)


async def tcp_echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.send_eof()


def test_relay_to_a_tcp_upstream_counts_bytes_and_carries_half_close(tls: Tls) -> None:
    results: list[RelayResult] = []

    async def main() -> None:
        async with trio.open_nursery() as outer:
            listeners = await outer.start(trio.serve_tcp, tcp_echo, 0)
            echo_port = listeners[0].socket.getsockname()[1]

            async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
                try:
                    upstream = await trio.open_tcp_stream("127.0.0.1", request.authority.port)
                except OSError:
                    await acceptor.reject(503, "upstream unreachable")
                    return
                tunnel = await acceptor.accept()
                results.append(await relay(tunnel, upstream))

            async with hbone_server(tls.server, handler) as (port, _), trio.open_nursery() as nursery:
                conn = await connect(nursery, port, tls.client)
                tunnel = await conn.open_tunnel(f"127.0.0.1:{echo_port}")
                data = b"x" * 300_000
                await tunnel.send_all(data)
                await tunnel.send_eof()
                assert await read_all(tunnel) == data
                await tunnel.aclose()
                with pytest.raises(TunnelRejected) as info:
                    await conn.open_tunnel("127.0.0.1:1")  # nothing listens there
                assert info.value.status == 503
                while not results:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    run(main)
    assert results == [RelayResult(a_to_b=300_000, b_to_a=300_000, error=None)]


def test_reset_reaches_the_other_side(tls: Tls) -> None:
    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        tunnel = await acceptor.accept()
        await tunnel.receive_some(10)
        # Returning while the client still sends: the tunnel is closed with a reset.

    async def main() -> None:
        async with hbone_server(tls.server, handler) as (port, _), trio.open_nursery() as nursery:
            conn = await connect(nursery, port, tls.client)
            tunnel = await conn.open_tunnel("10.0.0.1:80")
            await tunnel.send_all(b"first")
            # The server's FIN comes first (reads see EOF), then its reset: sending fails, like a TCP RST.
            with pytest.raises(TunnelReset):
                for _ in range(200):
                    assert await tunnel.receive_some(10) == b""
                    await tunnel.send_all(b"more")
                    await trio.sleep(0.01)
            assert conn.active_tunnels == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_client_refuses_a_server_with_the_wrong_identity(mint: Mint) -> None:
    wrong = tls_for(mint(SLEEP), mint(INTRUDER))

    async def main() -> None:
        async with hbone_server(wrong.server, echo_handler) as (port, _), trio.open_nursery() as nursery:
            with pytest.raises(HandshakeError, match="intruder"):
                await connect(nursery, port, wrong.client, expected=WEB)

    run(main)


def test_server_refuses_a_client_from_another_root(
    mint: Mint, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The client trusts the mesh root (so its side of the handshake is fine) but presents a certificate
    from another CA: the server must refuse it, and no HBONE connection may be served."""
    import dataclasses

    from ca.authority import CertificateAuthority
    from mesh.hbone.errors import HboneError
    from mesh.secrets.tls import client_context, server_context

    other = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("other-ca") / "ca")
    server_svid = mint(WEB)
    stranger = dataclasses.replace(mint_from(other)(SLEEP), trust_bundle=server_svid.trust_bundle)

    async def main() -> None:
        async with (
            hbone_server(server_context(server_svid), echo_handler) as (port, served),
            trio.open_nursery() as nursery,
        ):
            with pytest.raises((HboneError, trio.BrokenResourceError)):
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                conn = await open_hbone_connection(nursery, tcp, client_context(stranger), expected={WEB})
                tunnel = await conn.open_tunnel("10.0.0.1:80")
                await tunnel.send_all(b"hello")
                await tunnel.receive_some()
            assert served == []

    run(main)


def test_server_goaway_drains_then_closes(tls: Tls) -> None:
    async def main() -> None:
        async with hbone_server(tls.server, echo_handler) as (port, conns), trio.open_nursery() as nursery:
            conn = await connect(nursery, port, tls.client)
            tunnel = await conn.open_tunnel("10.0.0.1:80")
            while not conns:
                await trio.sleep(0.01)
            conns[0].goaway()
            while conn.can_open_tunnel():
                await trio.sleep(0.01)
            await tunnel.send_all(b"still here")
            await tunnel.send_eof()
            assert await read_all(tunnel) == b"still here"
            await tunnel.aclose()
            await conn.wait_closed()
            assert conn.is_closed

    run(main)
