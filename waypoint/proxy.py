"""The waypoint proxy: one inbound tunnel in, HTTP requests routed, secured and forwarded.

`WaypointProxy.serve_tunnel(stream, client)` is the whole entry point: the HBONE layer hands it each
inbound tunnel's byte stream with who the client is.  The request pipeline is `_handle`, readable top to
bottom:

    parse (HTTP/1.1 or HTTP/2, detected) -> the request's span (`waypoint.tracing`: the incoming trace
    context continued, or a new trace) -> normalization (method, path: 400 when impossible)
    -> forwarding headers (XFCC, XFF, Forwarded), x-request-id and the span's trace headers
    -> authentication (JWT; never waits for keys) -> route decision (pure) -> authorization -> fault
    (delay, abort) -> request body (buffered for retries) -> mirrors (fire and forget) -> forward with
    retries and timeouts (LB, outlier detection, pool limits) -> response header operations -> metrics,
    access log and the span, once

Routing, authentication and authorization all see the normalized request that is sent upstream, with the
JWT's header changes made, as Envoy's filters see it after its HTTP connection manager and jwt_authn.
`run()` is the proxy's background work (keeping JWKS fresh); the process runs it beside the listeners.

The route table is swapped whole by `update` (a reference assignment, atomic under trio): each request
reads the table once at its start and keeps that decision to the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import TypeGuard

import trio

from mesh.bounded import BoundedMemo
from mesh.hbone.relay import relay
from mesh.istiometrics import MUTUAL_TLS
from mesh.tracing.propagation import extract
from mesh.tracing.span import SpanKind
from mesh.tracing.tracer import Started, Tracer
from waypoint import tracing
from waypoint.accesslog import Sink, format_values, logger_sink
from waypoint.config import CompileResult, RouteTable, pool_changes
from waypoint.errors import STREAM_GONE, UpstreamError
from waypoint.http.detect import PrefixedStream, Protocol, detect
from waypoint.http.exchange import ServerExchange, TrailerExchange, iterate
from waypoint.http.http1 import Http1Server, Http1Settings
from waypoint.http.http2 import Http2Server
from waypoint.jwks import JwksCache
from waypoint.l7 import authz, jwt, routing
from waypoint.l7.forwarding import forwarding_headers, remote_ip
from waypoint.l7.model import ClientInfo, Endpoint, RequestHead, header, with_header
from waypoint.l7.normalize import NormalizationError, normalize_request
from waypoint.metrics import RequestLabels, TcpLabels, WaypointMetrics, peer_labels
from waypoint.upstream.forward import Forwarder, Record, RequestBody, send_local
from waypoint.upstream.pool import ConnectionPool, Upstream

L4Handler = Callable[[trio.abc.HalfCloseableStream, ClientInfo], Awaitable[None]]

LABEL_CACHE_SIZE = 4096  # label sets (and upstream protocols) kept per route table (cleared when full)
_TRAILERS: dict[type, bool] = {}
_UNAUTHENTICATED = jwt.AuthnResult(True)  # no JWT rule applies
_NO_POLICY = authz.AuthzDecision(True, "", "no ALLOW policy applies")  # what `authz.decide` says without policies


_ids: list[bytes] = []  # random bytes for request ids, read from the OS in blocks of `REQUEST_ID_BLOCK`
REQUEST_ID_BLOCK = 256


def new_request_id() -> str:
    """A random (version 4) UUID, as `str(uuid.uuid4())` writes it, from the OS's random source read
    `REQUEST_ID_BLOCK` ids at a time (one system call and no `UUID` object per request)."""
    if not _ids:
        block = os.urandom(16 * REQUEST_ID_BLOCK)
        _ids.extend(block[i:i + 16] for i in range(0, len(block), 16))
    raw = bytearray(_ids.pop())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _bodiless(head: RequestHead) -> bool:
    """An HTTP/1.x request whose framing says it has no body: no Transfer-Encoding, no Content-Length or
    a zero one (its end is already parsed with its head)."""
    if not head.protocol.startswith("HTTP/1") or head.header("transfer-encoding") is not None:
        return False
    length = head.header("content-length")
    return length is None or length == "0"


def _carries_trailers(ex: ServerExchange) -> TypeGuard[TrailerExchange]:
    """`isinstance(ex, TrailerExchange)`, decided once per class (a Protocol check is slow per request)."""
    known = _TRAILERS.get(type(ex))
    if known is None:
        known = _TRAILERS[type(ex)] = isinstance(ex, TrailerExchange)
    return known


@dataclass(frozen=True)
class ProxySettings:
    http1: Http1Settings = field(default_factory=Http1Settings)
    max_header_bytes: int = 60 * 1024
    retry_buffer_bytes: int = 64 * 1024
    detect_timeout: float = 5.0
    mirror_timeout: float = 10.0
    xff_trusted_hops: int = 0  # proxies in front whose x-forwarded-for entries are believed (Envoy's default 0)


class WaypointProxy:
    def __init__(self, upstream: Upstream, table: RouteTable | None = None, *,
                 settings: ProxySettings | None = None, metrics: WaypointMetrics | None = None,
                 access_log: Sink = logger_sink, rng: random.Random | None = None,
                 clock: Callable[[], float] = trio.current_time, jwks: JwksCache | None = None,
                 l4_handler: L4Handler | None = None, identity: str = "", tracer: Tracer | None = None) -> None:
        self.settings = settings or ProxySettings()
        self.tracer = tracer or Tracer()  # without an exporter: trace ids propagate, nothing is recorded
        self.upstream = upstream
        self.identity = identity  # the waypoint's own SPIFFE ID (x-forwarded-client-cert's By)
        self.metrics = metrics or WaypointMetrics()
        self.access_log = access_log
        self.rng = rng or random.Random()
        self.clock = clock
        self.jwks = jwks or JwksCache(clock=clock)
        self.pool = ConnectionPool(upstream, clock=clock)
        self.forwarder = Forwarder(self.pool, clock, self.rng)
        self.l4_handler = l4_handler or self.passthrough
        self._table = RouteTable()
        self._labels: BoundedMemo[tuple[object, ...], RequestLabels] = BoundedMemo(LABEL_CACHE_SIZE)  # seen, for this table
        self._clusters: routing.ClusterCache = BoundedMemo(routing.CLUSTER_CACHE_SIZE)  # resolved against this table
        self._protocols: BoundedMemo[tuple[str, int], str] = BoundedMemo(LABEL_CACHE_SIZE)  # (host, port) -> HTTP version
        self._sessions: set[Http1Server | Http2Server] = set()  # the HTTP connections served now
        self.draining = False
        self.update(table or RouteTable())

    # ---- configuration -------------------------------------------------------------------------------

    @property
    def table(self) -> RouteTable:
        return self._table

    def update(self, table: RouteTable) -> None:
        """Serve new requests with `table`; requests in flight finish with the table they started with, and
        no new request goes on an upstream connection whose endpoint or service it changed
        (`ConnectionPool.retire`, `waypoint.config.pool_changes`)."""
        old, self._table = self._table, table
        self.pool.retire(pool_changes(old, table))
        self._labels = BoundedMemo(LABEL_CACHE_SIZE)
        self._clusters = BoundedMemo(routing.CLUSTER_CACHE_SIZE)
        self._protocols = BoundedMemo(LABEL_CACHE_SIZE)
        self.jwks.want(table.jwks_sources())

    def apply(self, result: CompileResult) -> None:
        self.update(result.table)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The proxy's background work until cancelled: the key sets of `jwksUri`s fetched and refreshed,
        and upstream connections idle for too long closed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pool.run)
            await nursery.start(self.jwks.run)
            task_status.started()

    # ---- tunnels -------------------------------------------------------------------------------------

    async def serve_tunnel(self, stream: trio.abc.HalfCloseableStream, client: ClientInfo) -> None:
        """Serve one inbound tunnel until it closes.  Never raises for bad input from the client, nor for
        a client that goes (its stream broken or closed, reported by the tunnel's nursery in a group)."""
        try:
            protocol, prefix = await detect(stream, self.settings.detect_timeout)
            await self._serve(stream, client, protocol, prefix)
        except* STREAM_GONE:
            pass  # the tunnel is over

    async def serve_detected(self, stream: trio.abc.HalfCloseableStream, client: ClientInfo, protocol: Protocol,
                             prefix: bytes) -> None:
        """`serve_tunnel` of a tunnel whose protocol is known and whose first bytes, `prefix`, were read
        elsewhere (the engine's path hands such tunnels over: `waypoint.engine.hop`)."""
        try:
            await self._serve(stream, client, protocol, prefix)
        except* STREAM_GONE:
            pass

    async def _serve(self, stream: trio.abc.HalfCloseableStream, client: ClientInfo, protocol: Protocol,
                     prefix: bytes) -> None:
        async with trio.open_nursery() as background:  # mirrors outlive their request, not the tunnel
            async def handler(ex: ServerExchange) -> None:
                await self._handle(ex, client, background)

            if protocol is Protocol.HTTP2 or protocol is Protocol.HTTP1:
                session = Http2Server(stream, self.settings.max_header_bytes, initial=prefix) \
                    if protocol is Protocol.HTTP2 else Http1Server(stream, self.settings.http1, initial=prefix)
                self._sessions.add(session)
                if self.draining:
                    session.drain()
                try:
                    await session.serve(handler)
                finally:
                    self._sessions.discard(session)
            else:
                await self.l4_handler(PrefixedStream(stream, prefix), client)

    def drain(self) -> None:
        """The waypoint is going (as Envoy's drain): every HTTP client is asked to move to a new connection,
        HTTP/1.1 with `Connection: close` on its next response, HTTP/2 with GOAWAY; connections that start
        from now on are asked from their first request."""
        self.draining = True
        for session in list(self._sessions):
            session.drain()

    async def passthrough(self, stream: trio.abc.HalfCloseableStream, client: ClientInfo) -> None:
        """L4 fallback for traffic that is not HTTP: to an endpoint of the addressed service (or the
        addressed workload), bytes copied both ways with half-close."""
        table = self._table
        hostname = table.by_vip.get(client.destination_ip)
        svc = table.services[hostname] if hostname is not None else None
        target: Endpoint | None
        if svc is not None:
            eps = [e for e in svc.endpoints.get(client.destination_port, ()) if e.healthy]
            target = self.rng.choice(eps) if eps else None
        else:
            w = table.workloads_by_ip.get(client.destination_ip)
            target = dataclasses.replace(w, port=client.destination_port) if w else None
        with self.metrics.tcp.open(TcpLabels(**peer_labels(
                source=table.workloads_by_ip.get(client.source_ip), source_namespace=client.namespace,
                source_principal=client.peer_identity, destination=target, service_host=hostname or "",
                service_name=svc.name if svc else "", service_namespace=svc.namespace if svc else ""),
                connection_security_policy=MUTUAL_TLS)) as counted:
            if target is None:
                counted.close("UH" if hostname else "NR")
                await stream.aclose()
                return
            try:
                up = await self.upstream.connect(target, service=hostname or "", client=client.source)
            except (UpstreamError, OSError):
                counted.close("UF")
                await stream.aclose()
                return
            copied = await relay(stream, up, counter=counted)
            counted.close(("DC" if copied.failed == "a" else "UC") if copied.error else None)

    # ---- one request ---------------------------------------------------------------------------------

    async def _handle(self, ex: ServerExchange, client: ClientInfo, background: trio.Nursery) -> None:
        start, wall = self.clock(), datetime.datetime.now(datetime.UTC)
        table = self._table
        rec = Record()
        head = ex.head
        span = self.tracer.start(extract(head.header), table.tracing)
        hostname = routing.target_hostname(table, head, client)
        decision = routing.RouteDecision(table.services.get(hostname),
                                         table_version=table.version)  # until the route is decided
        authn = _UNAUTHENTICATED
        verdict = _NO_POLICY
        try:
            # the request as policies, routes and the service will see it
            try:
                normalized = normalize_request(head)
            except NormalizationError as exc:
                rec.details = str(exc)
                await send_local(ex, routing.LocalReply(400, f"bad request: {exc}".encode()), rec)
                return
            if normalized.authority != head.authority:  # (an absolute-form target named the host)
                hostname = routing.target_hostname(table, normalized, client)
            head = self._sent_head(normalized, client, span)
            # authentication: a present but invalid token is 401, and so is one whose keys are missing
            if table.jwt_rules:
                rules = [r for r in table.jwt_rules if r.applies_to(hostname)]
                authn = jwt.authenticate(rules, head, self.jwks.get, self.jwks.unavailable)
                if not authn.ok:
                    rec.details = authn.reason
                    await send_local(ex, routing.LocalReply(401, authn.reason.encode()), rec)
                    return
                if authn.changes_headers:
                    head = head.replace(headers=authn.apply(head.headers))
            decision = routing.decide(table, head, client, self.rng, self._clusters if table is self._table else None)
            # authorization (no policy at all: allowed, as `authz.decide` says for none that applies)
            if table.policies:
                verdict = authz.decide(table.policies, hostname, self._authz_request(head, client, authn))
            if not verdict.allowed:
                await send_local(ex, routing.LocalReply(403, authz.DENIED_BODY), rec)
                return
            # faults, then local replies of the route
            if decision.fault.delay is not None:
                rec.flag("DI")
                await trio.sleep(decision.fault.delay)
            if decision.fault.abort_status is not None:
                await send_local(ex, routing.LocalReply(decision.fault.abort_status, b"fault filter abort", "FI",
                                                        grpc_status=decision.fault.abort_grpc_status), rec)
                return
            if decision.local_reply is not None or decision.cluster is None or decision.request is None:
                await send_local(ex, decision.local_reply or routing.LocalReply(404, b"", "NR"), rec)
                return
            # the body: streamed upstream as it comes, kept up to a bound for retries (mirrors wait for it)
            body = RequestBody(ex.body(), self.settings.retry_buffer_bytes, rec,
                               (lambda: ex.request_trailers) if _carries_trailers(ex) else (lambda: ()))
            if decision.mirrors or _bodiless(ex.head):  # (no body: known ended now, no reader task waits on it)
                await body.prepare()
            if body.replayable:
                for m in decision.mirrors:
                    background.start_soon(self._mirror, m, body.buffered, client.forwarded_for)
            await self.forwarder.forward(ex, decision, body, rec, self._upstream_protocol(table, decision),
                                         client.forwarded_for)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            rec.flag("DC")
        finally:
            self._report(table, head, client, decision, rec, authn, verdict, start, wall, span)

    def _sent_head(self, head: RequestHead, client: ClientInfo, span: Started) -> RequestHead:
        """The head as it goes on, built once: the forwarding headers (XFCC, XFF, Forwarded), x-request-id
        (kept, or made) and the trace context of the waypoint's span."""
        scheme = client.scheme
        headers = forwarding_headers(head.headers, source_ip=client.source_ip, peer_identity=client.peer_identity,
                                     local_identity=self.identity, peer_certificate_hash=client.peer_certificate_hash,
                                     scheme=scheme or "http")
        if not header(headers, "x-request-id"):
            headers = with_header(headers, "x-request-id", new_request_id())
        return RequestHead(head.method, head.path, head.authority, tracing.request_headers(headers, span),
                           scheme or head.scheme, head.protocol)

    def _authz_request(self, head: RequestHead, client: ClientInfo, authn: jwt.AuthnResult) -> authz.AuthzRequest:
        return authz.AuthzRequest(method=head.method, path=head.uri_path, host=head.authority,
                                  port=client.destination_port, headers=head.headers, principal=client.principal,
                                  namespace=client.namespace, source_ip=client.source_ip,
                                  destination_ip=client.destination_ip,
                                  remote_ip=remote_ip(head.headers, client.source_ip, self.settings.xff_trusted_hops),
                                  request_principal=authn.principal, claims=authn.claims,
                                  audiences=authn.audiences, presenter=authn.presenter)

    def _upstream_protocol(self, table: RouteTable, d: routing.RouteDecision) -> str:
        assert d.cluster is not None
        if table is not self._table:  # a request that began under the table before
            return self._port_protocol(table, d.cluster)
        key = (d.cluster.hostname, d.cluster.port)
        found = self._protocols.get(key)
        if found is None:  # (workload-addressed clusters: any port; the memo is bounded)
            found = self._protocols.keep(key, self._port_protocol(table, d.cluster))
        return found

    @staticmethod
    def _port_protocol(table: RouteTable, cluster: routing.Cluster) -> str:
        svc = table.services.get(cluster.hostname)
        port = svc.port_info(cluster.port) if svc else None
        app = (port.app_protocol or port.name.split("-")[0]) if port else ""
        return "HTTP/2" if app in ("http2", "grpc", "h2c") else "HTTP/1.1"

    async def _mirror(self, m: routing.MirrorDecision, body: bytes, client: str = "") -> None:
        """Send a copy and forget it: its answer, errors and slowness never reach the client."""
        state = self.forwarder.state(m.cluster)
        ep = state.balancer.pick(m.cluster.policy.lb, m.cluster.endpoints)
        if ep is None:
            return
        with trio.move_on_after(self.settings.mirror_timeout):
            conn = None
            try:
                conn, _ = await self.pool.acquire(ep, "HTTP/1.1", m.cluster.policy.limits.connect_timeout,
                                                  m.cluster.hostname, client)
                await conn.send_request(m.request, iterate(body))
                await conn.receive_response()
                async for _chunk in conn.response_body():
                    pass
            except (UpstreamError, OSError, trio.BrokenResourceError):
                pass
            finally:
                if conn is not None:
                    await conn.aclose()

    def _report(self, table: RouteTable, head: RequestHead, client: ClientInfo, d: routing.RouteDecision,
                rec: Record, authn: jwt.AuthnResult, verdict: authz.AuthzDecision, start: float,
                wall: datetime.datetime, span: Started) -> None:
        duration_ms = max(0.0, (self.clock() - start) * 1000.0)
        src = table.workloads_by_ip.get(client.source_ip)
        ep = rec.upstream
        svc = d.service
        grpc = (head.header("content-type") or "").startswith("application/grpc")
        flags = rec.flag_text
        # the same few label sets come back request after request: built once per table
        key = (src, client.namespace, client.peer_identity, ep, svc.hostname if svc else head.authority,
               svc.name if svc else "", svc.namespace if svc else "", grpc, rec.status, flags)
        labels = self._labels.get(key) if table is self._table else None
        if labels is None:
            labels = RequestLabels(
                **peer_labels(source=src, source_namespace=src.namespace if src else client.namespace,
                              source_principal=client.peer_identity, destination=ep,
                              service_host=svc.hostname if svc else head.authority,
                              service_name=svc.name if svc else "", service_namespace=svc.namespace if svc else ""),
                request_protocol="grpc" if grpc else "http", response_code=str(rec.status),
                response_flags=flags)
            if table is self._table:
                self._labels.keep(key, labels)
        header_bytes = sum(map(len, chain.from_iterable(head.headers))) + len(head.path)
        self.metrics.record(labels, duration_ms, header_bytes + rec.bytes_received, rec.bytes_sent)
        if span.recording:
            namespace, _, name = table.waypoint.partition("/")
            self.tracer.finish(span, tracing.span_name(head, svc.hostname if svc else "", client.destination_port),
                               SpanKind.SERVER, tracing.attributes(
                                   head, status=rec.status, flags=flags,
                                   upstream_cluster=tracing.cluster_name(d.cluster),
                                   upstream_host=ep.key if ep else "", peer=client.source,
                                   request_bytes=header_bytes + rec.bytes_received, response_bytes=rec.bytes_sent,
                                   canonical_service=name or "waypoint", namespace=namespace,
                                   tags=table.tracing.custom_tags),
                               error=tracing.failed(rec.status), message=rec.details or flags)
        if not table.access_log.enabled:  # (Telemetry `accessLogging` turned it off)
            return
        line = format_values({  # (the fields of `AccessRecord`, without building one)
            "start_time": wall.isoformat(timespec="milliseconds"), "method": head.method, "path": head.path,
            "protocol": head.protocol, "response_code": rec.status, "response_flags": flags,
            "bytes_received": rec.bytes_received, "bytes_sent": rec.bytes_sent, "duration_ms": round(duration_ms, 3),
            "upstream_host": ep.key if ep else "", "upstream_cluster": tracing.cluster_name(d.cluster),
            "route_name": d.route_name, "authority": head.authority, "x_request_id": head.header("x-request-id") or "",
            "traceparent": head.header("traceparent") or "", "downstream_peer": client.source,
            "downstream_principal": client.peer_identity, "request_principal": authn.principal,
            "user_agent": head.header("user-agent") or "", "authz_policy": verdict.policy, "attempts": rec.attempts,
            "details": rec.details})
        with contextlib.suppress(Exception):  # a broken log sink must not break requests
            self.access_log(line)
