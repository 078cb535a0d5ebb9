"""HBONE against a real Envoy, both ways.

(a) Envoy originates: a TCP listener whose tcp_proxy tunnels each connection as an HTTP/2 CONNECT
    over mutual TLS (Envoy's certificate from our CA, ALPN h2) into our Python HBONE server.
(b) Envoy terminates: our client CONNECTs into an Envoy HTTP connection manager that requires a
    client certificate from our CA and forwards the tunnel to a TCP echo server (or answers 503).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from envoy_helpers import (
    ENVOY_ID,
    SLEEP,
    WEB,
    addr,
    free_port,
    run_envoy,
    static_cluster,
    tls_common,
    write_svid,
)

from mesh.hbone.client import open_hbone_connection
from mesh.hbone.errors import TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.server import InboundRequest, TunnelAcceptor, serve_hbone
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid
from mesh.secrets.tls import client_context, server_context

TEST_TIMEOUT = 20
PAYLOAD = hashlib.sha256(b"interop").digest() * (2 * 1024 * 1024 // 32)  # 2 MiB

Mint = Callable[[SpiffeId], Svid]


def run_trio(fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await fn()

    trio.run(bounded)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(1 << 20):
        out += data
    return bytes(out)


async def send_then_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    for i in range(0, len(data), 256 * 1024):
        await stream.send_all(data[i : i + 256 * 1024])
    await stream.send_eof()


async def round_trip(stream: trio.abc.HalfCloseableStream, data: bytes) -> bytes:
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await read_all(stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await send_then_eof(stream, data)
    return got[0]


def envoy_originating_config(listen: int, hbone_port: int, target: str, certs: Any) -> dict[str, Any]:
    tcp_proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "hbone_out",
        "cluster": "hbone",
        "tunneling_config": {
            "hostname": target,
            "headers_to_add": [
                {"header": {"key": "forwarded", "value": 'for="%DOWNSTREAM_REMOTE_ADDRESS%"'}},
                {"header": {"key": "baggage", "value": "k8s.namespace.name=default"}},
            ],
        },
    }
    upstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls_common(certs, {"exact": WEB.uri}),
        },
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": addr(listen),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]}
                    ],
                }
            ],
            "clusters": [
                static_cluster(
                    "hbone", hbone_port, transport_socket=upstream_tls, typed_extension_protocol_options=http2
                )
            ],
        }
    }


def test_envoy_originates_hbone_into_our_server(envoy_bin: str, mint: Mint, tmp_path: Path) -> None:
    listen, hbone_port = free_port(), free_port()
    certs = write_svid(mint(ENVOY_ID), tmp_path / "envoy-certs")
    server_ctx = server_context(mint(WEB))
    seen: list[InboundRequest] = []

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        seen.append(request)
        if request.authority.port == 9:
            await acceptor.reject(401, "denied by policy")
            return
        tunnel = await acceptor.accept()
        while data := await tunnel.receive_some(1 << 20):
            await tunnel.send_all(data)
        await tunnel.send_eof()  # echo finished: half-close back

    async def on_tls(tcp: trio.SocketStream) -> None:
        await serve_hbone(trio.SSLStream(tcp, server_ctx, server_side=True), handler)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(hbone_port, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, on_tls, listeners)
            client = await trio.open_tcp_stream("127.0.0.1", listen)
            assert await round_trip(client, PAYLOAD) == PAYLOAD
            await client.aclose()
            nursery.cancel_scope.cancel()

    config = envoy_originating_config(listen, hbone_port, "10.244.1.5:8080", certs)
    with run_envoy(envoy_bin, config, tmp_path / "envoy"):
        run_trio(main)
    (request,) = seen
    assert str(request.authority) == "10.244.1.5:8080"
    assert request.peer == ENVOY_ID  # Envoy's client certificate, checked by serve_hbone
    assert request.forwarded_for is not None and request.forwarded_for.startswith("127.0.0.1:")
    assert request.baggage == "k8s.namespace.name=default"


def test_envoy_sees_our_rejection(envoy_bin: str, mint: Mint, tmp_path: Path) -> None:
    """A 401 from our server makes Envoy drop the downstream TCP connection without data."""
    listen, hbone_port = free_port(), free_port()
    certs = write_svid(mint(ENVOY_ID), tmp_path / "envoy-certs")
    server_ctx = server_context(mint(WEB))
    statuses: list[int] = []

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        statuses.append(401)
        await acceptor.reject(401, "denied by policy")

    async def on_tls(tcp: trio.SocketStream) -> None:
        await serve_hbone(trio.SSLStream(tcp, server_ctx, server_side=True), handler)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(hbone_port, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, on_tls, listeners)
            client = await trio.open_tcp_stream("127.0.0.1", listen)
            await client.send_all(b"hello?")
            with contextlib.suppress(trio.BrokenResourceError):  # a reset is as good as a close here
                assert await read_all(client) == b""
            await client.aclose()
            nursery.cancel_scope.cancel()

    config = envoy_originating_config(listen, hbone_port, "10.244.1.5:9", certs)
    with run_envoy(envoy_bin, config, tmp_path / "envoy") as envoy:
        run_trio(main)
        assert statuses == [401]
        assert envoy.process.poll() is None


def envoy_terminating_config(listen: int, echo_port: int, dead_port: int, certs: Any) -> dict[str, Any]:
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": tls_common(certs, {"prefix": "spiffe://cluster.local/"}),
        },
    }
    connect_route = {"upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "hbone",
            "virtual_hosts": [
                {
                    "name": "echo",
                    "domains": [f"127.0.0.1:{echo_port}"],
                    "routes": [
                        {"match": {"connect_matcher": {}}, "route": {"cluster": "echo", **connect_route}}
                    ],
                },
                {
                    "name": "other",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"connect_matcher": {}}, "route": {"cluster": "dead", **connect_route}}
                    ],
                },
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone_in",
                    "address": addr(listen),
                    "filter_chains": [
                        {
                            "transport_socket": downstream_tls,
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ],
                        }
                    ],
                }
            ],
            "clusters": [static_cluster("echo", echo_port), static_cluster("dead", dead_port)],
        }
    }


async def tcp_echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(1 << 20):
        await stream.send_all(data)
    await stream.send_eof()


def test_our_client_through_envoy_terminating_connect(envoy_bin: str, mint: Mint, tmp_path: Path) -> None:
    listen, echo_port, dead_port = free_port(), free_port(), free_port()
    certs = write_svid(mint(WEB), tmp_path / "envoy-certs")
    client_ctx = client_context(mint(SLEEP))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(echo_port, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, tcp_echo, listeners)
            tcp = await trio.open_tcp_stream("127.0.0.1", listen)
            conn = await open_hbone_connection(nursery, tcp, client_ctx, expected={WEB})
            headers = request_headers(
                forwarded_for="10.244.0.7:41234", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"
            )
            # Several tunnels at once on the one connection, each with its own data and half-close.
            results: dict[int, bool] = {}

            async def one(i: int) -> None:
                tunnel = await conn.open_tunnel(f"127.0.0.1:{echo_port}", headers)
                data = PAYLOAD[: 100_000 * (i + 1)]
                results[i] = await round_trip(tunnel, data) == data
                await tunnel.aclose()

            async with trio.open_nursery() as tunnels:
                for i in range(5):
                    tunnels.start_soon(one, i)
            assert results == {i: True for i in range(5)}
            big = await conn.open_tunnel(f"127.0.0.1:{echo_port}", headers)
            assert await round_trip(big, PAYLOAD) == PAYLOAD
            await big.aclose()
            with pytest.raises(TunnelRejected) as info:
                await conn.open_tunnel("10.0.0.9:80", headers)  # routed to a cluster nobody listens on
            assert info.value.status == 503
            await conn.aclose()
            nursery.cancel_scope.cancel()

    with run_envoy(
        envoy_bin, envoy_terminating_config(listen, echo_port, dead_port, certs), tmp_path / "envoy"
    ) as envoy:
        run_trio(main)
        stats = envoy.stats("hbone_in")
        assert stats.get("http.hbone_in.downstream_rq_total", 0) >= 7
