"""Gateway mode: the waypoint's L7 engine in front of the mesh, as an ingress Gateway's pod.

    client (outside the mesh) --TCP--> listener (HTTP, or HTTPS terminated with the Gateway's certificate)
        --> WaypointProxy.serve_tunnel: routes by Host header and path (`RouteTable.ingress`), filters,
            retries, timeouts --> HboneUpstream: HBONE with the gateway's own identity to the destination
            pod's node agent, or to the service's waypoint when it has one (`ViaWaypoint`)

One `--listener` per Gateway listener, `NAME=HTTP:PORT` or `NAME=HTTPS:PORT:CERT_FILE:KEY_FILE` (PEM
files: the chain and key of the listener's Secret, which the deployment hands the pod).  The client's
address is the connection's peer; the listener's port is the "original destination" port that picks the
listener's routes.  Bytes that are not HTTP get the connection closed.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from mesh.hbone.errors import HboneError, TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey
from waypoint.config import RouteTable
from waypoint.errors import STREAM_GONE, ConnectFailure
from waypoint.l7.model import ClientInfo, Endpoint
from waypoint.listen import open_listeners
from waypoint.proxy import WaypointProxy
from waypoint.upstream.connect import HboneUpstream, endpoint_identity

log = logging.getLogger("waypoint.gateway")

PROTOCOLS = ("HTTP", "HTTPS")
HANDSHAKE_TIMEOUT = 10.0  # seconds for a client's TLS handshake


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    protocol: str  # HTTP or HTTPS
    port: int
    cert_file: str = ""
    key_file: str = ""

    def __str__(self) -> str:
        tail = f":{self.cert_file}:{self.key_file}" if self.protocol == "HTTPS" else ""
        return f"{self.name}={self.protocol}:{self.port}{tail}"


def check_listeners(listeners: list[ListenerSpec]) -> None:
    """`ValueError` unless the listeners can be served together: names used once, and a port shared only by
    HTTP listeners (one socket; the routes' hostnames tell them apart)."""
    names: set[str] = set()
    for spec in listeners:
        if spec.name in names:
            raise ValueError(f"--listener {spec.name}: the name is used twice")
        names.add(spec.name)
        sharing = [other for other in listeners if other.port == spec.port]
        if len({other.protocol for other in sharing}) > 1:
            raise ValueError(f"--listener {spec.name}: port {spec.port} is used by HTTP and HTTPS listeners")
        if spec.protocol == "HTTPS" and len(sharing) > 1:
            raise ValueError(f"--listener {spec.name}: port {spec.port} has another listener: an HTTPS listener "
                             "needs a port of its own (one certificate per port)")


def parse_listener(text: str) -> ListenerSpec:
    """`NAME=HTTP:PORT` or `NAME=HTTPS:PORT:CERT_FILE:KEY_FILE`; `ValueError` saying what is wrong."""
    name, sep, rest = text.partition("=")
    usage = "write NAME=HTTP:PORT or NAME=HTTPS:PORT:CERT_FILE:KEY_FILE"
    if not sep or not name:
        raise ValueError(f"--listener {text!r}: no listener name: {usage}")
    parts = rest.split(":")
    protocol = parts[0].upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"--listener {text!r}: protocol {parts[0]!r} is not HTTP or HTTPS")
    if len(parts) != (4 if protocol == "HTTPS" else 2):
        raise ValueError(f"--listener {text!r}: {usage}")
    try:
        port = int(parts[1])
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ValueError(f"--listener {text!r}: port {parts[1]!r} is not a number from 1 to 65535")
    if protocol == "HTTPS" and not (parts[2] and parts[3]):
        raise ValueError(f"--listener {text!r}: an HTTPS listener needs its certificate and key files: {usage}")
    return ListenerSpec(name, protocol, port, *(parts[2:4] if protocol == "HTTPS" else ()))


def server_context(spec: ListenerSpec) -> ssl.SSLContext:
    """TLS for an HTTPS listener: the certificate chain and key of its Secret, TLS 1.2 or later, ALPN h2
    and http/1.1."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (spec.cert_file, spec.key_file):
        if not Path(path).is_file():
            raise ValueError(f"listener {spec.name}: {path} does not exist")
    try:
        ctx.load_cert_chain(spec.cert_file, spec.key_file)
    except ssl.SSLError as exc:
        raise ValueError(f"listener {spec.name}: {spec.cert_file} and {spec.key_file} are not a PEM certificate "
                         f"chain and its key: {exc.reason or exc}") from None
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


class TerminatedStream(trio.abc.HalfCloseableStream):
    """A TLS connection as the proxy reads it.  TLS has no half-close: `send_eof` does nothing (the
    connection closes whole, with close_notify, at `aclose`)."""

    def __init__(self, inner: trio.SSLStream[trio.SocketStream]) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        return

    async def aclose(self) -> None:
        await self.inner.aclose()


class ViaWaypoint:
    """The gateway's upstream: HBONE with its own identity to the endpoint's node agent (`HboneUpstream`),
    or, for a service that has a waypoint, to that waypoint with `:authority` = the service's VIP:port (as
    Istio's ingress does), so the service's L7 policy applies to traffic from outside too."""

    def __init__(self, hbone: HboneUpstream) -> None:
        self.hbone = hbone
        self.table = RouteTable()  # the proxy's current table (`use`), for the services' waypoints

    def use(self, table: RouteTable) -> None:
        self.table = table

    async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                      traceparent: str = "") -> trio.abc.HalfCloseableStream:
        hop = waypoint_hop(self.table, endpoint, service)
        if hop is None:
            return await self.hbone.connect(endpoint, service=service, client=client, traceparent=traceparent)
        waypoint, authority = hop
        key = PoolKey(source=self.hbone.identity, destination=endpoint_identity(waypoint, self.hbone.trust_domain),
                      address=(waypoint.address, self.hbone.hbone_port))
        headers = request_headers(forwarded_for=client or None, service_host=service or None,
                                  traceparent=traceparent or None)
        try:
            return await self.hbone.pool.open_tunnel(key, authority, headers)
        except TunnelRejected as exc:
            raise ConnectFailure(f"waypoint {waypoint.namespace}/{waypoint.name} refused the tunnel to {authority} "
                                 f"with {exc.status}: {exc.reason or 'no reason given'}") from None
        except HboneError as exc:
            raise ConnectFailure(f"HBONE to waypoint {waypoint.key} for {authority}: {exc}") from None


def waypoint_hop(table: RouteTable, endpoint: Endpoint, service: str) -> tuple[Endpoint, str] | None:
    """(the waypoint's pod, the tunnel's `:authority` VIP:port) to send a request for `service` through,
    or None to go to `endpoint` itself (no waypoint, or none of its pods is healthy)."""
    svc = table.services.get(service)
    if svc is None or not svc.waypoint or not svc.vips:
        return None
    pods = table.waypoint_pods(svc.waypoint)
    if not pods:
        return None
    port = next((p.port for p in svc.ports if p.target_port == endpoint.port), svc.default_port())
    return pods[0], f"{svc.vips[0]}:{port}"


class IngressListeners:
    """The gateway's listeners, handing each connection to the proxy."""

    def __init__(self, proxy: WaypointProxy, listeners: list[ListenerSpec], host: str = "0.0.0.0", *,
                 reuse_port: bool = False) -> None:
        self.proxy = proxy
        self.reuse_port = reuse_port  # each port shared with the gateway's other workers (`waypoint.listen`)
        self.specs = listeners
        self.host = host
        self.contexts = {s.name: server_context(s) for s in listeners if s.protocol == "HTTPS"}
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every listener's port until cancelled; reports listener name -> bound port."""
        async with trio.open_nursery() as nursery:
            ports: dict[str, int] = {}
            bound: dict[int, int] = {}  # listeners that share a port (HTTP, by hostname) share its socket
            for spec in self.specs:
                if spec.port in bound and spec.port:
                    ports[spec.name] = bound[spec.port]
                    continue
                sockets = await open_listeners(spec.port, self.host, shared=self.reuse_port)
                ports[spec.name] = bound[spec.port] = sockets[0].socket.getsockname()[1]
                nursery.start_soon(partial(trio.serve_listeners, partial(self._connection, spec), sockets,
                                           handler_nursery=nursery))
            task_status.started(ports)

    async def _connection(self, spec: ListenerSpec, conn: trio.SocketStream) -> None:
        self.connections += 1
        try:
            peer = conn.socket.getpeername()
            client = ClientInfo(source=f"{peer[0]}:{peer[1]}", original_destination=f"{self.host}:{spec.port}",
                                scheme=spec.protocol.lower())
            stream: trio.abc.HalfCloseableStream = conn
            if spec.protocol == "HTTPS":
                tls = trio.SSLStream(conn, self.contexts[spec.name], server_side=True)
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                    await tls.do_handshake()
                if scope.cancelled_caught:
                    await trio.aclose_forcefully(conn)
                    return
                stream = TerminatedStream(tls)
            await self.proxy.serve_tunnel(stream, client)
        except* STREAM_GONE as group:
            log.debug("listener %s: connection ended: %s", spec.name, group.exceptions[0])
        except* Exception:  # one connection's failure is not the listener's: logged, and the gateway goes on
            log.exception("listener %s: connection failed", spec.name)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(conn)


async def refuse_l4(stream: trio.abc.HalfCloseableStream, client: ClientInfo) -> None:
    """What the gateway does with bytes that are not HTTP: closes the connection."""
    await stream.aclose()
