"""The waypoint's HBONE wiring over real sockets and real TLS: its certificate from a CA over gRPC with a
workload token, the HBONE upstream against a stand-in destination agent, and the inbound server end to
end (a source agent's HBONE client -> admission -> HTTP routing -> a backend)."""

from __future__ import annotations

import json
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from waypoint_harness import start_backend
from waypoint_hbone_helpers import (
    RATINGS_ID,
    REVIEWS_ID,
    SLEEP_ID,
    WAYPOINT_ID,
    MeshCA,
    fake_agent,
    receive_all,
    running_ca,
    start_tcp,
)
from waypoint_resources import fq, l7, service, workload

from mesh.hbone.errors import TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.errors import CertificateRequestError
from waypoint.config import RouteTable, compile_table
from waypoint.errors import ConnectFailure
from waypoint.http.exchange import iterate
from waypoint.http.http1 import Http1Client
from waypoint.inbound import InboundServer, Refusal, admit
from waypoint.l7.model import ClientInfo, Endpoint, RequestHead
from waypoint.proxy import WaypointProxy
from waypoint.upstream.connect import HboneUpstream

pytestmark = pytest.mark.timeout(60)

CLIENT = "10.244.1.7:40000"


def _tcp_samples(proxy: WaypointProxy, name: str) -> list[Any]:
    return [s for m in proxy.metrics.registry.collect() for s in m.samples if s.name == name]


def run(fn: Callable[[], Awaitable[None]], limit: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()
    trio.run(main)


@pytest.fixture
def ca(tmp_path: Path) -> MeshCA:
    with running_ca(tmp_path) as c:
        yield c  # type: ignore[misc]


def test_the_ca_signs_a_waypoint_its_own_identity_only(ca: MeshCA) -> None:
    async def main() -> None:
        certs, client = ca.secret_manager(WAYPOINT_ID)
        with client:
            async with trio.open_nursery() as n:
                await n.start(certs.run)
                svid = await certs.get(WAYPOINT_ID)
                assert svid.identity == WAYPOINT_ID
                with pytest.raises(CertificateRequestError, match="may only have"):
                    await certs.get(SLEEP_ID)  # a workload token is good for its own identity alone
                n.cancel_scope.cancel()
    run(main)


# ---- the HBONE upstream ----------------------------------------------------------------------------


def test_upstream_tunnels_to_the_endpoint_agent_with_forwarded_and_checks_its_identity(ca: MeshCA) -> None:
    async def main() -> None:
        certs, client = ca.secret_manager(WAYPOINT_ID)
        with client:
            async with trio.open_nursery() as n, fake_agent(ca, REVIEWS_ID, deny_ports=frozenset({9999})) as agent:
                await n.start(certs.run)
                await certs.get(WAYPOINT_ID)
                pool = HbonePool(tcp_connect, certs.client_context, connect_timeout=5)
                await n.start(pool.run)
                up = HboneUpstream(pool, WAYPOINT_ID, hbone_port=agent.port)
                ep = Endpoint("127.0.0.1", 9080, name="reviews-v1", namespace="bookinfo",
                              identity=str(REVIEWS_ID), hbone=True)

                stream = await up.connect(ep, service=fq("reviews"), client=CLIENT)
                await stream.send_all(b"ping")
                await stream.send_eof()
                assert await receive_all(stream) == b"ping"
                await stream.aclose()
                seen = agent.seen[-1]
                assert seen.authority == "127.0.0.1:9080"  # podIP:targetPort
                assert seen.forwarded == f'for="{CLIENT}";host={fq("reviews")}'
                assert seen.peer == str(WAYPOINT_ID)  # the waypoint's own certificate

                # The destination agent's refusal is a connect failure that says why.
                with pytest.raises(ConnectFailure, match="401: denied by bookinfo/deny-all"):
                    await up.connect(Endpoint("127.0.0.1", 9999, identity=str(REVIEWS_ID), hbone=True))
                # A server that is not the endpoint's workload never gets the request.
                with pytest.raises(ConnectFailure, match="expected spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"):
                    await up.connect(Endpoint("127.0.0.1", 9080, identity=str(RATINGS_ID), hbone=True))
                assert len(agent.seen) == 2
                # Nobody listening: a connect failure naming the address.
                with pytest.raises(ConnectFailure, match="127.0.0.1"):
                    await HboneUpstream(pool, WAYPOINT_ID, hbone_port=1).connect(ep)
                n.cancel_scope.cancel()
    run(main)


def test_upstream_uses_plain_tcp_outside_the_mesh() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            port = await start_tcp(n)
            pool = HbonePool(tcp_connect, lambda _: pytest.fail("no TLS for a plain endpoint"))  # type: ignore[arg-type,return-value]
            up = HboneUpstream(pool, WAYPOINT_ID)
            stream = await up.connect(Endpoint("127.0.0.1", port, hbone=False), client=CLIENT)
            await stream.send_all(b"plain")
            await stream.send_eof()
            assert await receive_all(stream) == b"plain"
            with pytest.raises(ConnectFailure, match="cannot connect to 127.0.0.1:1"):
                await up.connect(Endpoint("127.0.0.1", 1))
            n.cancel_scope.cancel()
    run(main)


# ---- admission ------------------------------------------------------------------------------------


def _table(backends: dict[str, int], echo_port: int = 7000, configs: list[pb.L7Config] | None = None) -> RouteTable:
    wls = []
    for version, port in backends.items():
        w = workload(f"reviews-{version}", "127.0.0.1", "reviews", version, target_port=port)
        w.tunnel_protocol = pb.NONE  # the test backends are plain TCP
        wls.append(w)
    echo = workload("echo", "127.0.0.1", "echo", port=7000, target_port=echo_port)
    echo.tunnel_protocol = pb.NONE
    sleep = pb.Workload(uid="bookinfo/sleep", name="sleep", namespace="bookinfo", addresses=["10.244.1.7"],
                        service_account="sleep", tunnel_protocol=pb.HBONE,
                        waypoint=pb.GatewayAddress(name="waypoint", namespace="bookinfo"))
    other = pb.Workload(uid="bookinfo/other", name="other", namespace="bookinfo", addresses=["10.244.1.8"],
                        tunnel_protocol=pb.HBONE)
    result = compile_table("bookinfo/waypoint", [*wls, echo, sleep, other],
                           [service("reviews", "10.96.0.11"), service("echo", "10.96.0.12", port=7000)],
                           configs or [])
    assert not result.errors
    return result.table


def test_admit_takes_service_vips_and_workloads_that_use_the_waypoint() -> None:
    from mesh.hbone.headers import parse_authority

    table = _table({"v1": 1})
    ok = admit(table, parse_authority("10.96.0.11:9080"), SLEEP_ID, CLIENT, "10.244.1.1:5000")
    # The client is the connection's own peer: a Forwarded naming another address is not believed.
    assert ok == ClientInfo(str(SLEEP_ID), "10.244.1.1:5000", "10.96.0.11:9080")
    # No Forwarded header: the connection's own peer address is the client.
    assert isinstance(ok2 := admit(table, parse_authority("10.244.1.7:80"), SLEEP_ID, None, "10.244.1.1:5000"),
                      ClientInfo) and ok2.source == "10.244.1.1:5000"
    for bad in ("10.96.0.11:81", "10.96.0.99:9080", "10.244.1.8:80"):  # wrong port, unknown VIP, no waypoint
        refusal = admit(table, parse_authority(bad), SLEEP_ID, CLIENT, "?")
        assert isinstance(refusal, Refusal) and refusal.status == 400 and bad in refusal.reason


# ---- the inbound server end to end ---------------------------------------------------------------


async def _http_get(tunnel: trio.abc.HalfCloseableStream, path: str, headers: tuple = ()) -> tuple[int, bytes, dict]:
    c = Http1Client(tunnel)  # type: ignore[arg-type]
    try:
        await c.send_request(RequestHead("GET", path, "reviews:9080", tuple(headers)), iterate(b""))
        head = await c.receive_response()
        body = b"".join([chunk async for chunk in c.response_body()])
        return head.status, body, dict(head.headers)
    finally:
        await c.aclose()


def test_inbound_routes_by_authority_refuses_unknown_and_applies_l4_policy(ca: MeshCA) -> None:
    deny_l4 = l7("AuthorizationPolicy", "echo-viewers", {"action": "ALLOW", "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/productpage"]}}]}]}, [fq("echo")])

    async def main() -> None:
        certs, client = ca.secret_manager(WAYPOINT_ID)
        lines: list[str] = []
        with client:
            async with trio.open_nursery() as n:
                await n.start(certs.run)
                v1 = await start_backend(n, "v1")
                echo_port = await start_tcp(n)
                hbone_out = HbonePool(tcp_connect, certs.client_context)
                await n.start(hbone_out.run)
                proxy = WaypointProxy(HboneUpstream(hbone_out, WAYPOINT_ID), _table({"v1": v1.port}, echo_port),
                                      access_log=lines.append, rng=random.Random(3))
                events: list[str] = []
                inbound = InboundServer(proxy, certs, WAYPOINT_ID, event_log=events.append)
                proxy.l4_handler = inbound.l4
                port = await n.start(inbound.serve, "127.0.0.1", 0)
                sleep = ca.client_pool(SLEEP_ID)
                await n.start(sleep.run)
                key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", port))

                # HTTP to the service VIP: routed to the backend, the client seen as it really is.
                tunnel = await sleep.open_tunnel(key, "10.96.0.11:9080", request_headers(forwarded_for=CLIENT))
                status, body, headers = await _http_get(tunnel, "/reviews/0", (("end-user", "jason"),))
                assert status == 200 and headers["x-backend"] == "v1"
                assert json.loads(body)["headers"]["end-user"] == "jason"
                with trio.fail_after(2):
                    while not lines:
                        await trio.sleep(0.01)
                entry = json.loads(lines[0])
                # The HBONE connection's own peer, not the address the client wrote in Forwarded.
                assert entry["downstream_peer"].startswith("127.0.0.1:") and entry["downstream_principal"] == str(SLEEP_ID)
                assert entry["response_code"] == 200 and entry["upstream_host"] == f"127.0.0.1:{v1.port}"
                metrics = list(proxy.metrics.http.requests.collect())[0].samples
                assert any(s.labels["reporter"] == "waypoint" and s.labels["response_code"] == "200"
                           and s.labels["destination_service"] == fq("reviews") for s in metrics)

                # Unknown authority: 400 before any byte flows.
                with pytest.raises(TunnelRejected) as refused:
                    await sleep.open_tunnel(key, "10.96.0.99:9080", request_headers(forwarded_for=CLIENT))
                assert refused.value.status == 400 and "neither a service" in refused.value.reason
                assert inbound.refused == 1 and "tunnel refused" in events[0]

                # Not HTTP: L4 passthrough, no policy yet.
                tunnel = await sleep.open_tunnel(key, "10.96.0.12:7000", request_headers(forwarded_for=CLIENT))
                await tunnel.send_all(b"\x16\x03\x01 not http")
                await tunnel.send_eof()
                assert await receive_all(tunnel) == b"\x16\x03\x01 not http"
                await tunnel.aclose()
                # ... counted with Istio's TCP metrics, reporter "waypoint", both ends labelled.
                with trio.fail_after(2):
                    while not (tcp := _tcp_samples(proxy, "istio_tcp_connections_closed_total")):
                        await trio.sleep(0.01)
                assert tcp[0].labels["reporter"] == "waypoint" and tcp[0].labels["source_principal"] == str(SLEEP_ID)
                assert tcp[0].labels["destination_service"] == fq("echo") and tcp[0].value == 1
                received = _tcp_samples(proxy, "istio_tcp_received_bytes_total")
                assert received[0].value == len(b"\x16\x03\x01 not http")

                # An ALLOW policy for another principal: the waypoint closes the tunnel at L4.
                proxy.update(_table({"v1": v1.port}, echo_port, [deny_l4]))
                tunnel = await sleep.open_tunnel(key, "10.96.0.12:7000", request_headers(forwarded_for=CLIENT))
                await tunnel.send_all(b"\x16\x03\x01 not http")
                await tunnel.send_eof()
                with suppress(trio.BrokenResourceError):  # closed cleanly or reset: closed either way
                    assert await receive_all(tunnel) == b""  # nothing reached the echo server
                denied = json.loads(events[-1])
                assert denied["event"] == "connection denied" and denied["authority"] == "10.96.0.12:7000"
                assert "no ALLOW policy matched (bookinfo/echo-viewers)" in denied["reason"]

                # Draining: GOAWAY to the client, the listener closed.
                inbound.drain()
                with trio.fail_after(5):
                    while inbound.connections:
                        await trio.sleep(0.02)
                n.cancel_scope.cancel()
    run(main, 30)


def test_a_connection_that_fails_before_or_in_its_handshake_ends_alone(ca: MeshCA) -> None:
    """Whatever a peer does to 15008 before its HBONE connection is up (closes at once, sends bytes that
    are not TLS, resets mid-handshake, offers no client certificate) ends that connection only: the
    waypoint keeps serving the next client."""
    async def main() -> None:
        certs, client = ca.secret_manager(WAYPOINT_ID)
        with client:
            async with trio.open_nursery() as n:
                await n.start(certs.run)
                v1 = await start_backend(n, "v1")
                hbone_out = HbonePool(tcp_connect, certs.client_context)
                await n.start(hbone_out.run)
                proxy = WaypointProxy(HboneUpstream(hbone_out, WAYPOINT_ID), _table({"v1": v1.port}),
                                      access_log=lambda line: None)
                inbound = InboundServer(proxy, certs, WAYPOINT_ID, event_log=lambda line: None)
                port = await n.start(inbound.serve, "127.0.0.1", 0)

                async def hostile(data: bytes, reset: bool = False) -> None:
                    tcp = await trio.open_tcp_stream("127.0.0.1", port)
                    if data:
                        await tcp.send_all(data)
                    if reset:
                        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await tcp.aclose()

                await hostile(b"")  # connects and closes at once
                await hostile(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS
                await hostile(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", reset=True)  # reset mid-ClientHello
                no_cert = ssl.create_default_context()
                no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
                tls = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), no_cert)
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await tls.do_handshake()
                    await tls.receive_some(1)  # TLS 1.3: the refusal of the missing certificate comes after
                await trio.aclose_forcefully(tls)
                with trio.fail_after(2):
                    while inbound.connections:
                        await trio.sleep(0.01)

                sleep = ca.client_pool(SLEEP_ID)
                await n.start(sleep.run)
                key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", port))
                tunnel = await sleep.open_tunnel(key, "10.96.0.11:9080", request_headers(forwarded_for=CLIENT))
                status, _, headers = await _http_get(tunnel, "/reviews/0")
                assert status == 200 and headers["x-backend"] == "v1"
                n.cancel_scope.cancel()
    run(main, 30)
