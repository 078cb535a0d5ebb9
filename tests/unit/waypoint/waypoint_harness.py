"""Real sockets on 127.0.0.1 for the waypoint's integration tests: small HTTP/1.1 backends with scripted
behaviours, a front listener that hands each connection to the proxy as a tunnel, and a client."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio

from mesh.proto import discovery_pb2 as pb
from waypoint.config import compile_table
from waypoint.http.exchange import iterate
from waypoint.http.http1 import Http1Client, Http1Settings
from waypoint.l7.model import ClientInfo, RequestHead, ResponseHead
from waypoint.proxy import ProxySettings, WaypointProxy
from waypoint.upstream.pool import TcpUpstream

NS = "bookinfo"
WAYPOINT = "bookinfo/waypoint"


@dataclass
class Backend:
    """An HTTP/1.1 server.  Paths: /status/N answers N; /hang never answers; /slow/SECONDS waits;
    /reset sends half a body then closes; anything else echoes what it got as JSON."""

    name: str
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    always: int = 0  # answer every request with this status
    hang: bool = False  # never answer
    closed: bool = False

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req, body = None, b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                assert req is not None
                path = req.target.decode()
                info = {"backend": self.name, "method": req.method.decode(), "path": path, "body": body.decode(),
                        "headers": {k.decode(): v.decode() for k, v in req.headers}}
                self.seen.append(info)
                status, payload = self.always or 200, json.dumps(info).encode()
                if self.hang:
                    await trio.sleep_forever()
                if path.startswith("/status/"):
                    status = int(path.split("/")[2])
                elif path.startswith("/hang"):
                    await trio.sleep_forever()
                elif path.startswith("/slow/"):
                    await trio.sleep(float(path.split("/")[2]))
                elif path.startswith("/reset"):
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", "100000"), ("x-backend", self.name)])))
                    await stream.send_all(conn.send(h11.Data(data=b"x" * 1000)))
                    await stream.aclose()
                    return
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                    ("content-length", str(len(payload))), ("content-type", "application/json"),
                    ("x-backend", self.name)])))
                await stream.send_all(conn.send(h11.Data(data=payload)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()


async def start_backend(nursery: trio.Nursery, name: str, always: int = 0) -> Backend:
    b = Backend(name, always=always)
    listeners = await nursery.start(partial(trio.serve_tcp, b.serve, 0, host="127.0.0.1"))
    b.port = listeners[0].socket.getsockname()[1]
    return b


def fq(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


def service(name: str, vip: str, port: int = 9080) -> pb.Service:
    return pb.Service(name=name, namespace=NS, hostname=fq(name), vips=[vip],
                      ports=[pb.ServicePort(service_port=port, target_port=port, name="http")])


def workload(name: str, svc: str, version: str, target_port: int, address: str = "127.0.0.1") -> pb.Workload:
    return pb.Workload(uid=f"{NS}/{name}", name=name, namespace=NS, addresses=[address],
                       service_account=f"bookinfo-{svc}", canonical_name=svc, canonical_revision=version,
                       labels={"app": svc, "version": version},
                       services={f"{NS}/{fq(svc)}": pb.PortList(ports=[pb.PortMapping(service_port=9080,
                                                                                       target_port=target_port)])})


def table(services: list[pb.Service], workloads: list[pb.Workload], configs: list[pb.L7Config], version: int = 0) -> Any:
    result = compile_table(WAYPOINT, workloads, services, configs, version)
    assert not result.errors, result.errors
    return result.table


@dataclass
class Front:
    """Accepts TCP connections and serves each as an inbound tunnel addressed to `destination`."""

    proxy: WaypointProxy
    destination: str
    peer: str = "spiffe://cluster.local/ns/bookinfo/sa/sleep"
    port: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        src = f"{host}:{port}"
        await self.proxy.serve_tunnel(stream, ClientInfo(self.peer, src, self.destination))


@asynccontextmanager
async def running_proxy(tbl: Any, destination: str = "10.96.0.11:9080", settings: ProxySettings | None = None,
                        **kw: Any) -> AsyncIterator[tuple[WaypointProxy, Front, list[str], trio.Nursery]]:
    log: list[str] = []
    proxy = WaypointProxy(TcpUpstream(), tbl, settings=settings or ProxySettings(
        http1=Http1Settings(max_header_bytes=8192, header_timeout=0.5)), access_log=log.append,
        rng=random.Random(11), **kw)
    front = Front(proxy, destination)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)  # its background work, as the process runs it
        listeners = await nursery.start(partial(trio.serve_tcp, front.handle, 0, host="127.0.0.1"))
        front.port = listeners[0].socket.getsockname()[1]
        yield proxy, front, log, nursery
        nursery.cancel_scope.cancel()


async def request(port: int, path: str = "/", method: str = "GET", headers: tuple = (), body: bytes = b"",
                  authority: str = "reviews:9080", client: Http1Client | None = None) -> tuple[ResponseHead, bytes]:
    own = client is None
    c = client or Http1Client(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        hdrs = tuple(headers) + ((("content-length", str(len(body))),) if body else ())
        await c.send_request(RequestHead(method, path, authority, hdrs), iterate(body))
        head = await c.receive_response()
        data = b"".join([chunk async for chunk in c.response_body()])
        if not own:
            assert c.reusable
        return head, data
    finally:
        if own:
            await c.aclose()


async def raw(port: int, data: bytes, wait: float = 2.0) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(wait):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                out += chunk
    return out


async def logged(log: list[str], count: int = 1) -> dict[str, Any]:
    """The access-log entry number `count` (1-based), once written (it follows the response)."""
    with trio.fail_after(2):
        while len(log) < count:
            await trio.sleep(0.005)
    return json.loads(log[count - 1])
