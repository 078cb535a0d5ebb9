"""The waypoint in gateway mode (`waypoint.gateway`): listener flags, certificates, and real sockets on
127.0.0.1: an HTTP and an HTTPS listener (TLS terminated with a test CA's certificate) handing requests to
the proxy, which routes them by Host header with an ingress table to a plain HTTP backend; and the hop
through a service's waypoint."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from pathlib import Path

import pytest
import trio
from waypoint_harness import start_backend
from waypoint_resources import fq, l7, service

from mesh.proto import discovery_pb2 as pb
from tests.tlsfiles import server_cert
from waypoint.config import compile_table
from waypoint.gateway import (
    IngressListeners,
    ListenerSpec,
    check_listeners,
    parse_listener,
    refuse_l4,
    server_context,
    waypoint_hop,
)
from waypoint.l7.model import Endpoint
from waypoint.proxy import WaypointProxy
from waypoint.upstream.pool import TcpUpstream

pytestmark = pytest.mark.timeout(60)
GW = "bookinfo/ingress"


def test_listener_flags() -> None:
    assert parse_listener("http=HTTP:80") == ListenerSpec("http", "HTTP", 80)
    assert parse_listener("s=https:443:/c.pem:/k.pem") == ListenerSpec("s", "HTTPS", 443, "/c.pem", "/k.pem")


@pytest.mark.parametrize("text,problem", [
    ("HTTP:80", "no listener name"),
    ("a=TCP:80", "is not HTTP or HTTPS"),
    ("a=HTTP:0", "from 1 to 65535"),
    ("a=HTTP:eighty", "from 1 to 65535"),
    ("a=HTTP:80:x", "write NAME=HTTP:PORT"),
    ("a=HTTPS:443", "write NAME=HTTP:PORT"),
    ("a=HTTPS:443::", "needs its certificate and key files"),
])
def test_bad_listener_flags(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_listener(text)


def test_listeners_that_cannot_be_served_together() -> None:
    http, other_http = parse_listener("a=HTTP:80"), parse_listener("b=HTTP:80")
    check_listeners([http, other_http])  # one socket, told apart by the routes' hostnames
    https = parse_listener("s=HTTPS:80:/c:/k")
    with pytest.raises(ValueError, match="used by HTTP and HTTPS listeners"):
        check_listeners([http, https])
    with pytest.raises(ValueError, match="needs a port of its own"):
        check_listeners([https, parse_listener("t=HTTPS:80:/c:/k")])
    with pytest.raises(ValueError, match="used twice"):
        check_listeners([http, parse_listener("a=HTTP:81")])


def test_bad_certificate_files(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(ValueError, match="does not exist"):
        server_context(ListenerSpec("s", "HTTPS", 443, str(tmp_path / "none.pem"), str(tmp_path / "k.pem")))
    with pytest.raises(ValueError, match="are not a PEM certificate chain and its key"):
        server_context(ListenerSpec("s", "HTTPS", 443, str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))


def plain_workload(name: str, port: int) -> pb.Workload:
    return pb.Workload(uid=f"bookinfo/{name}", name=name, namespace="bookinfo", addresses=["127.0.0.1"],
                       service_account="bookinfo-reviews", tunnel_protocol=pb.NONE,
                       services={f"bookinfo/{fq('reviews')}": pb.PortList(ports=[pb.PortMapping(
                           service_port=9080, target_port=port)])})


async def request(port: int, host: str, path: str, ca: bytes | None = None) -> tuple[int, dict[str, object]]:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ca is not None:
        ctx = ssl.create_default_context(cadata=ca.decode())
        stream = trio.SSLStream(stream, ctx, server_hostname=host)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body) if status == 200 else {}


def test_http_and_https_listeners_route_by_host(tmp_path: Path) -> None:
    cert = server_cert("shop.example.com")
    (tmp_path / "c.pem").write_bytes(cert.chain)
    (tmp_path / "k.pem").write_bytes(cert.key)
    trio.run(serve_and_ask, tmp_path, cert.ca)


async def serve_ingress(nursery: trio.Nursery, tmp_path: Path) -> dict[str, int]:
    """An ingress proxy for shop.example.com (/reviews to a backend) on an HTTP and an HTTPS listener."""
    backend = await start_backend(nursery, "reviews-v1")
    vs = {"hosts": ["shop.example.com"], "gateways": [GW],
          "http": [{"match": [{"uri": {"prefix": "/reviews"}}], "route": [{"destination": {"host": fq("reviews"),
                                                                                             "port": {"number": 9080}}}]}]}
    result = compile_table(GW, [plain_workload("reviews-v1", backend.port)], [service("reviews", "10.96.0.11")],
                           [l7("VirtualService", "gateway-api~ingress~shop.example.com", vs, ["shop.example.com"],
                               waypoints=[GW])], ingress=True)
    assert not result.errors, result.errors
    proxy = WaypointProxy(TcpUpstream(), result.table, l4_handler=refuse_l4,
                          identity="spiffe://cluster.local/ns/bookinfo/sa/ingress-istio")
    listeners = IngressListeners(proxy, [ListenerSpec("http", "HTTP", 0),
                                         ListenerSpec("https", "HTTPS", 0, str(tmp_path / "c.pem"),
                                                      str(tmp_path / "k.pem"))], host="127.0.0.1")
    ports: dict[str, int] = await nursery.start(listeners.serve)
    return ports


async def serve_and_ask(tmp_path: Path, ca: bytes) -> None:
    async with trio.open_nursery() as nursery:
        ports = await serve_ingress(nursery, tmp_path)
        status, seen = await request(ports["http"], "shop.example.com", "/reviews/1")
        assert (status, seen["backend"], seen["path"]) == (200, "reviews-v1", "/reviews/1")
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"  # type: ignore[index]
        assert seen["headers"]["x-forwarded-proto"] == "http"  # type: ignore[index]
        status, seen = await request(ports["https"], "shop.example.com", "/reviews/2", ca=ca)
        assert (status, seen["path"]) == (200, "/reviews/2")
        assert seen["headers"]["x-forwarded-proto"] == "https"  # type: ignore[index]
        assert (await request(ports["http"], "nothing.example.org", "/reviews/1"))[0] == 404
        assert (await request(ports["http"], "shop.example.com", "/other"))[0] == 404
        nursery.cancel_scope.cancel()


def test_a_service_with_a_waypoint_is_reached_through_it() -> None:
    wp = pb.Workload(uid="bookinfo/waypoint", name="waypoint", namespace="bookinfo", addresses=["10.244.1.200"],
                     service_account="waypoint", tunnel_protocol=pb.HBONE, is_waypoint=True,
                     labels={"gateway.networking.k8s.io/gateway-name": "waypoint"})
    with_waypoint = service("reviews", "10.96.0.11")
    without = service("ratings", "10.96.0.12", waypoint="")
    table = compile_table(GW, [wp], [with_waypoint, without], [], ingress=True).table
    hop = waypoint_hop(table, Endpoint("10.244.1.11", 9080, hbone=True), fq("reviews"))
    assert hop is not None
    pod, authority = hop
    assert (pod.address, pod.identity, authority) == ("10.244.1.200", "spiffe://cluster.local/ns/bookinfo/sa/waypoint",
                                                      "10.96.0.11:9080")
    assert waypoint_hop(table, Endpoint("10.244.1.12", 9080, hbone=True), fq("ratings")) is None


def test_a_client_that_breaks_off_ends_its_own_connection_only(tmp_path: Path) -> None:
    """Connections closed at once, reset in the middle of an HTTP/2 preface, a TLS handshake or a request,
    or speaking something else, end alone: the gateway keeps serving."""
    cert = server_cert("shop.example.com")
    (tmp_path / "c.pem").write_bytes(cert.chain)
    (tmp_path / "k.pem").write_bytes(cert.key)

    async def hostile(port: int, data: bytes, reset: bool = True) -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        if data:
            await tcp.send_all(data)
            await trio.sleep(0.05)  # the gateway is reading it
        if reset:
            tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await tcp.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = trio.current_time() + 20
            ports = await serve_ingress(nursery, tmp_path)
            h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
            for port in ports.values():
                await hostile(port, b"", reset=False)
                await hostile(port, b"")
                await hostile(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                await hostile(port, h2_preface)
                await hostile(port, b"GET /reviews/1 HTTP/1.1\r\nhost: shop.exa")
                await hostile(port, b"\x00\xff not a protocol at all\r\n\r\n")
            status, seen = await request(ports["http"], "shop.example.com", "/reviews/1")
            assert (status, seen["path"]) == (200, "/reviews/1")
            status, seen = await request(ports["https"], "shop.example.com", "/reviews/2", ca=cert.ca)
            assert (status, seen["path"]) == (200, "/reviews/2")
            nursery.cancel_scope.cancel()
    trio.run(main)
