"""A measurement prototype, not the product's path: the waypoint's L7 hop on asyncio Protocols and uvloop,
for choosing the engine of the waypoint's data path by the numbers (`python -m bench.waypoint_bench
--engine asyncio`, against the trio `WaypointProxy` with `--engine trio`).

It does per request what `waypoint.proxy.WaypointProxy` does on the benchmark's path (an HTTP/1.1 request on
a tunnel to a service VIP, routed to the service, forwarded over a pooled keep-alive HTTP/1.1 connection)
with the same code wherever that code is sans-IO, so that what differs is the engine and the task
structure alone:

- parsing and writing HTTP/1.1: `waypoint.http.http1`'s reader over httptools, its head and body framing
  (imported by their module-private names: the prototype must run the very same code);
- the pipeline's steps: `WaypointProxy`'s own synchronous methods on a proxy object that holds the route
  table, caches, tracer, metrics and access-log sink (`_sent_head`: forwarding headers, x-request-id, trace
  headers; `_upstream_protocol`; `_authz_request`; `_report`: metrics, span and the access-log line), and
  the functions its `_handle` calls (`routing.target_hostname`, `normalize_request`, `routing.decide`,
  `jwt.authenticate`, `authz.decide`);
- forwarding: the `Forwarder`'s cluster state (balancer, outlier detector, limiter), `Record`, the retry
  and gRPC rules, and the response header operations, driven from callbacks.

Over HBONE (`python -m bench.waypoint_hbone_bench`), the hop sits between two of the engine's tunnels, all
on one loop: `tunnel_handler` is the handler of `mesh.hbone.aio.serve_tls` (the inbound's `admit`, then each
accepted tunnel read as a client connection), `TunnelPool` opens upstream tunnels on an `AioPool` as
`HboneUpstream` does, and `TunnelTransport` joins a protocol of the hop to a `TunnelEnd` (where a `Splice`
would join it to a TCP connection).  There the engine's server also runs the handler of each CONNECT in a
task of its own, as it does in the node agent.

The only task is the dial of a new upstream connection; everything else runs in the transports'
callbacks: a request is routed and written upstream from the client's `data_received`, the response goes to
the client from the upstream's `data_received` (its head with the body bytes that came with it, in one
write), and the outcome is recorded when the response has ended.  Retries (with backoff), per-try and route
timeouts and fault delays are timers armed only when the route has them; header, idle and detection
timeouts and the upstream pool's idle expiry are one sweep per second over all connections, not a timer per
request.

Left out, compared with the trio path (none of it is on the benchmark's path):
- HTTP/2 (prior knowledge from clients, and endpoints whose port is HTTP/2: answered 503 here) and L4
  passthrough of traffic that is not HTTP (such a connection is closed, also when detection times out);
- streaming request bodies: a body is read whole before the request is routed (unbounded; the trio path
  streams it and keeps at most `retry_buffer_bytes` for retries), and request trailers; an error in a body
  is answered without an access-log line;
- mirrors; upgrades and CONNECT (the connection is closed after the response);
- a request the cluster's limits would queue is answered 503 `UO` (the trio path waits for a slot);
- the upstream pool's `retire` on route-table changes and its bookkeeping (a weak-dictionary and a weak-set
  look-up per request on the trio path), `drain`, JWKS refreshing (`WaypointProxy.run`), and the linger
  before closing a refused client.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import signal
from collections.abc import Callable
from typing import Any, cast

from mesh import defaults
from mesh.hbone.aio import AioAcceptor, AioHandler, TunnelEnd
from mesh.hbone.aiopool import AioPool
from mesh.hbone.config import HBONE_PORT
from mesh.hbone.errors import HboneError, TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey as HbonePoolKey
from mesh.hbone.server import InboundRequest
from mesh.hbone.splice import Splice
from mesh.identity import SpiffeId
from mesh.tracing.propagation import extract
from waypoint.errors import ConnectFailure, UpstreamError, UpstreamReset
from waypoint.http.detect import Protocol, sniff
from waypoint.http.http1 import (
    _CHUNKED,
    _CLOSED,
    _END,
    _LENGTH,
    _NO_BODY_METHODS,
    _NONE,
    _REASONS,
    READ_SIZE,
    _Bad,
    _content_length,
    _Data,
    _Head,
    _head_bytes,
    _LocalError,
    _Reader,
    _request_head,
    _Writer,
    error_response,
    response_framing,
)
from waypoint.inbound import Refusal, admit
from waypoint.l7 import authz, grpc, jwt, routing
from waypoint.l7.limits import Admission
from waypoint.l7.model import ClientInfo, Endpoint, RequestHead, ResponseHead, forwardable
from waypoint.l7.normalize import NormalizationError, normalize_request
from waypoint.l7.retry import Outcome, backoff, outcome_of, retriable
from waypoint.proxy import _NO_POLICY, _UNAUTHENTICATED, WaypointProxy
from waypoint.upstream.connect import endpoint_identity
from waypoint.upstream.forward import ClusterState, Record, _available
from waypoint.upstream.pool import MAX_IDLE_PER_KEY, PoolKey

SWEEP_INTERVAL = 1.0  # seconds between sweeps for header, idle and detection timeouts
PAUSE_BYTES = 4 * READ_SIZE  # bytes a busy client may send ahead (pipelined) before its reading pauses
STALE_TRIES = 3  # sends of one attempt on pooled connections found dead (as `Forwarder._attempt`)
ClientFor = Callable[[Any], ClientInfo]  # the transport's peer name -> who sent the tunnel
_UNDECIDED = routing.RouteDecision(None)  # (until `start` decides: what a request refused before it records)


class Phase(enum.Enum):
    """Of a client connection."""

    DETECTING = "detecting"  # its first bytes decide HTTP/1.x or not
    IDLE = "idle"  # waiting for a request's head
    BODY = "body"  # a request's head is in, its body is still arriving
    BUSY = "busy"  # the request is being answered
    CLOSED = "closed"


class UpPhase(enum.Enum):
    """Of an upstream connection."""

    IDLE = "idle"  # no request, or the last exchange ended cleanly
    WAITING = "waiting"  # a request has gone out, its response head has not come
    RECEIVING = "receiving"  # the response's body is coming
    CLOSED = "closed"


class AsyncioHop:
    """The hop: a listener's protocol factory and what its connections share."""

    def __init__(self, proxy: WaypointProxy, loop: asyncio.AbstractEventLoop, client_for: ClientFor) -> None:
        self.proxy = proxy
        self.loop = loop
        self.clock = proxy.clock
        self.client_for = client_for
        self.pool = UpstreamPool(self)
        self.clients: set[_Client] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def serve(self, host: str, port: int) -> asyncio.Server:
        server = await self.loop.create_server(lambda: _Client(self), host, port, reuse_address=True)
        self.start()
        return server

    def start(self) -> None:
        """Arm the sweep (`serve` does; a hop fed by HBONE tunnels calls it itself)."""
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = self.clock()
        for client in list(self.clients):
            if client.phase in (Phase.IDLE, Phase.DETECTING) and now >= client.deadline:
                client.timed_out()
        self.pool.expire(now)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)


# ---- the client side ------------------------------------------------------------------------------------

class _Client(asyncio.Protocol):
    """One client connection (a tunnel): its requests one after the other, keep-alive, as `Http1Server`."""

    def __init__(self, hop: AsyncioHop) -> None:
        self.hop = hop
        settings = hop.proxy.settings
        self.settings = settings.http1
        self.reader = _Reader(True, self.settings.max_header_bytes)
        self.phase = Phase.DETECTING
        self.deadline = hop.clock() + settings.detect_timeout
        self.transport: asyncio.Transport | None = None
        self.info = ClientInfo()
        self.exchange: _Exchange | None = None
        self.version = "1.1"  # of the current request
        self.keep_alive = True  # the current exchange leaves the connection usable
        self.upgrade = False
        self._prefix = b""
        self._head_begun = False  # (idle) the next head's first bytes have come: `header_timeout` runs
        self._ahead = 0  # bytes received while busy
        self._pumping = False  # `_pump` is running up the stack: it picks up what a callback made ready
        self._out: list[bytes] = []

    # -- transport callbacks ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not its subclasses)
        self.info = self.hop.client_for(self.transport.get_extra_info("peername"))
        self.hop.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.DETECTING:
            data = self._prefix + data
            verdict = sniff(data)
            if verdict is Protocol.UNDECIDED:
                self._prefix = data
                return
            if verdict is not Protocol.HTTP1:  # (HTTP/2 and L4 passthrough are left out)
                self.close()
                return
            self._prefix = b""
            self._idle()
        self.reader.feed(data)
        if self.phase is Phase.IDLE:
            if not self.reader.events and self.reader.in_head and not self._head_begun:
                self._head_begun = True  # the rest of the head within `header_timeout`
                self.deadline = self.hop.clock() + self.settings.header_timeout
        else:
            self._ahead += len(data)
            if self._ahead > PAUSE_BYTES and self.transport is not None:
                self.transport.pause_reading()
        self._pump()
        self.flush()

    def eof_received(self) -> bool:
        self.reader.closed()
        self._pump()
        self.flush()
        return True  # (half-closed: the answer in progress still goes out; `_pump` closes after it)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hop.clients.discard(self)
        self.phase = Phase.CLOSED
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.client_lost()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upstream(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upstream(False)

    # -- output ----------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if data:
            self._out.append(data)

    def flush(self) -> None:
        """What the current callback produced, in one write."""
        out = self._out
        if out and self.transport is not None and self.phase is not Phase.CLOSED:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self.phase = Phase.CLOSED

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` and close (no linger, unlike `Http1Server._refuse`)."""
        self.write(error_response(status, message))
        self.close()

    def timed_out(self) -> None:
        if self.phase is Phase.IDLE and self.reader.in_head:
            self.refuse(408, "request headers did not arrive in time")
        else:
            self.close()

    # -- requests --------------------------------------------------------------------------------------

    def _idle(self) -> None:
        self.phase = Phase.IDLE
        self.deadline = self.hop.clock() + self.settings.idle_timeout
        self._head_begun = False
        if self._ahead > PAUSE_BYTES and self.transport is not None:
            self.transport.resume_reading()
        self._ahead = 0

    def _pump(self) -> None:
        """Start the requests whose heads have come, and read the current one's body, while the connection
        is free for them (a loop, not recursion: a local reply finishes within it)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            events = self.reader.events
            while events:
                if self.phase is Phase.IDLE:
                    event = events.popleft()
                    if isinstance(event, _Head):
                        self._begin(event)
                    elif event is _CLOSED:
                        self.close()
                    elif isinstance(event, _Bad):
                        self.refuse(event.status, event.message)
                    else:
                        self.refuse(400, f"unexpected {type(event).__name__.strip('_').lower()} before a request")
                elif self.phase is Phase.BODY:
                    self._body(events.popleft())
                else:
                    return  # busy, or closed: the rest waits (or is dropped)
        finally:
            self._pumping = False

    def _begin(self, event: _Head) -> None:
        if event.size > self.settings.max_header_bytes:
            self.refuse(431, f"request headers are {event.size} bytes, more than {self.settings.max_header_bytes}")
            return
        self.version = event.version
        self.keep_alive = event.keep_alive
        self.upgrade = event.upgrade
        self.phase = Phase.BODY
        self.exchange = _Exchange(self, _request_head(event), event.method)

    def _body(self, event: object) -> None:
        ex = self.exchange
        assert ex is not None
        if isinstance(event, _Data):
            ex.body.append(event.data)
            ex.rec.bytes_received += len(event.data)
        elif event is _END:
            self.phase = Phase.BUSY
            ex.start()
        elif isinstance(event, _Bad):
            ex.refused(event.status, event.message)
        else:
            ex.refused(400, "request body ended early")

    def finished(self) -> None:
        """The current exchange is over (answered and recorded): the next request, or the close."""
        self.exchange = None
        if self.phase is Phase.CLOSED:
            return
        if not self.keep_alive or self.upgrade:
            self.close()
            return
        self._idle()
        self._pump()


# ---- one request --------------------------------------------------------------------------------------

class _Exchange:
    """One request, from its head to its recorded outcome: `WaypointProxy._handle`, `Forwarder.forward`
    and `_ServerExchange` of the trio path, as callbacks."""

    def __init__(self, client: _Client, head: RequestHead, method: str) -> None:
        self.client = client
        self.hop = client.hop
        self.received = head  # as the client sent it (what local replies and gRPC checks read)
        self.head = head  # as it is recorded: the sent head once built
        self.method = method
        self.body: list[bytes] = []
        self.rec = Record()
        proxy = self.hop.proxy
        self.table = proxy.table
        self.decision = _UNDECIDED
        self.authn = _UNAUTHENTICATED
        self.verdict = _NO_POLICY
        self.start_time = 0.0
        self.wall = datetime.datetime.min
        self.span: Any = None
        self.state: ClusterState | None = None
        self.protocol = "HTTP/1.1"
        self.limited = False  # holds a slot of the cluster's limiter
        self.retries_left = 0
        self.tried: set[str] = set()
        self.endpoint: Endpoint | None = None  # of the attempt in flight
        self.conn: _Upstream | None = None
        self.stale_tries = 0
        self.writer = _Writer(_NONE)
        self.started = False  # the response head has been written
        self.deferred = False  # a gRPC answer without grpc-status in its head: outlier detection at its end
        self.retrying = False  # a retry's backoff is running (it holds a retry of the limiter)
        self.done = False
        self.route_timer: asyncio.TimerHandle | None = None
        self.try_timer: asyncio.TimerHandle | None = None  # the attempt in flight's per-try timeout
        self.wait_timer: asyncio.TimerHandle | None = None  # a fault's delay, or a retry's backoff

    # -- the pipeline (`WaypointProxy._handle`) --------------------------------------------------------

    def start(self) -> None:
        hop, proxy, client, rec = self.hop, self.hop.proxy, self.client.info, self.rec
        self.start_time, self.wall = hop.clock(), datetime.datetime.now(datetime.UTC)
        table = self.table
        head = self.received
        self.span = proxy.tracer.start(extract(head.header), table.tracing)
        hostname = routing.target_hostname(table, head, client)
        self.decision = routing.RouteDecision(table.services.get(hostname), table_version=table.version)
        try:
            normalized = normalize_request(head)
        except NormalizationError as exc:
            rec.details = str(exc)
            self.local(routing.LocalReply(400, f"bad request: {exc}".encode()))
            return
        if normalized.authority != head.authority:
            hostname = routing.target_hostname(table, normalized, client)
        head = self.head = proxy._sent_head(normalized, client, self.span)
        if table.jwt_rules:
            rules = [r for r in table.jwt_rules if r.applies_to(hostname)]
            self.authn = jwt.authenticate(rules, head, proxy.jwks.get, proxy.jwks.unavailable)
            if not self.authn.ok:
                rec.details = self.authn.reason
                self.local(routing.LocalReply(401, self.authn.reason.encode()))
                return
            if self.authn.changes_headers:
                head = self.head = head.replace(headers=self.authn.apply(head.headers))
        d = self.decision = routing.decide(table, head, client, proxy.rng,
                                           proxy._clusters if table is proxy.table else None)
        if table.policies:
            self.verdict = authz.decide(table.policies, hostname, proxy._authz_request(head, client, self.authn))
        if not self.verdict.allowed:
            self.local(routing.LocalReply(403, authz.DENIED_BODY))
            return
        if d.fault.delay is not None:
            rec.flag("DI")
            self.wait_timer = hop.loop.call_later(d.fault.delay, self._delayed)
            return
        self._after_delay()

    def _delayed(self) -> None:
        self._after_delay()
        self.client.flush()

    def _after_delay(self) -> None:
        d = self.decision
        if d.fault.abort_status is not None:
            self.local(routing.LocalReply(d.fault.abort_status, b"fault filter abort", "FI",
                                          grpc_status=d.fault.abort_grpc_status))
            return
        if d.local_reply is not None or d.cluster is None or d.request is None:
            self.local(d.local_reply or routing.LocalReply(404, b"", "NR"))
            return
        self.protocol = self.hop.proxy._upstream_protocol(self.table, d)
        if self.protocol != "HTTP/1.1":  # (left out: HTTP/2 endpoints)
            self.local(routing.LocalReply(503, b"HTTP/2 endpoints are not in the asyncio prototype", "UF"))
            return
        self._forward()

    # -- forwarding (`Forwarder.forward`, `_attempts`, `_attempt`) -------------------------------------

    def _forward(self) -> None:
        d = self.decision
        assert d.cluster is not None and d.request is not None
        state = self.state = self.hop.proxy.forwarder.state(d.cluster)
        if state.limiter.admit() is not Admission.PROCEED:
            self.rec.flag("UO")
            self.local(routing.LocalReply(503, b"upstream connect error or disconnect/reset before headers. "
                                               b"reset reason: overflow", "UO"))
            return
        state.limiter.active += 1  # (what `ClusterLimiter.acquire` does when it admits at once)
        self.limited = True
        timeout = grpc.request_timeout(d.timeout, d.request)
        if timeout:  # from the end of the request (here: now) to the end of the response
            self.route_timer = self.hop.loop.call_later(timeout, self._route_timeout)
        self.retries_left = d.retries.attempts
        self._attempt()

    def _attempt(self) -> None:
        d, state, rec = self.decision, self.state, self.rec
        assert d.cluster is not None and state is not None
        cluster = d.cluster
        rec.attempts += 1
        ep = state.balancer.pick(cluster.policy.lb, cluster.endpoints, _available(state.outlier, self.hop.clock()),
                                 frozenset(self.tried))
        if ep is None:
            self.local(routing.LocalReply(503, b"no healthy upstream", "UH"))
            return
        self.tried.add(ep.key)
        rec.upstream = ep
        state.balancer.started(ep)
        self.endpoint = ep
        self.stale_tries = 0
        per_try = d.retries.per_try_timeout
        if per_try:
            self.try_timer = self.hop.loop.call_later(per_try, self._per_try_timeout)
        self._send(ep)

    def _send(self, ep: Endpoint) -> None:
        d = self.decision
        assert d.cluster is not None and d.request is not None
        self.stale_tries += 1
        conn = self.hop.pool.acquire(ep, self.protocol, self.service, self.client.info.forwarded_for)
        if conn is None:
            self.hop.pool.dial(ep, self.protocol, self.service, self.client.info.forwarded_for,
                               d.cluster.policy.limits.connect_timeout, self)
        else:
            self.send_on(conn, reused=True)

    @property
    def service(self) -> str:
        return self.decision.service.hostname if self.decision.service else ""

    def send_on(self, conn: _Upstream, reused: bool) -> None:
        """The request on `conn` (a pooled one, or one just dialled for it)."""
        if self.done or self.endpoint is None:  # (the client went, or a timeout answered, meanwhile)
            self.hop.pool.release(conn)
            return
        self.conn = conn
        assert self.decision.request is not None
        try:
            conn.send_request(self, self.decision.request, self.body, reused)
        except _LocalError as exc:
            self.conn = None
            conn.close()
            self._attempt_over()
            self.refused(400, f"request cannot be sent as HTTP/1.1: {exc}")

    def dial_failed(self, exc: ConnectFailure) -> None:
        if self.done or self.endpoint is None:
            return
        self._failed(exc, reused=False)
        self.client.flush()

    def upstream_lost(self, exc: UpstreamReset, reused: bool) -> None:
        """The endpoint's connection went (or sent what is not HTTP) before the response ended."""
        self.conn = None
        if self.started:  # the client sees the response cut short
            self.rec.flag(exc.flag)
            self.rec.details = str(exc)
            self.client.close()
            self.finish()
            return
        self._failed(exc, reused)

    def _failed(self, exc: UpstreamError, reused: bool) -> None:
        ep = self.endpoint
        assert ep is not None
        if reused and isinstance(exc, UpstreamReset) and self.stale_tries < STALE_TRIES:
            self._send(ep)  # a pooled connection found dead: sent again without counting a try
            return
        self._attempt_over()
        self._judge(ep, outcome_of(exc), None)

    def _attempt_over(self) -> None:
        assert self.state is not None and self.endpoint is not None
        self.state.balancer.finished(self.endpoint)
        self.endpoint = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def _judge(self, ep: Endpoint, outcome: Outcome, head: ResponseHead | None) -> None:
        """What `_attempts` does with an attempt's result: outlier detection, a retry, or the answer."""
        d, state = self.decision, self.state
        assert d.cluster is not None and d.request is not None and state is not None
        deferred = self.deferred = head is not None and grpc.is_grpc(d.request) and outcome.grpc_status is None
        if state.outlier is not None and not deferred:
            state.outlier.record(ep.key, outcome.outlier_status, self.hop.clock(), len(d.cluster.endpoints))
        if self.retries_left > 0 and retriable(outcome, d.retries.retry_on) and state.limiter.try_retry():
            self.retries_left -= 1
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.retrying = True
            self.wait_timer = self.hop.loop.call_later(backoff(self.rec.attempts, self.hop.proxy.rng), self._retry)
        elif head is not None:
            try:
                self._relay_head(head)
            except _LocalError:  # (an endpoint's head that cannot go out as HTTP/1.1: the client is closed)
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                self.client.close()
                self.finish()
        else:
            self._fail(outcome)

    def _retry(self) -> None:
        assert self.state is not None
        self.retrying = False
        self.state.limiter.retry_done()
        if not self.done:
            self._attempt()
            self.client.flush()

    def _fail(self, outcome: Outcome) -> None:
        if outcome.failure == "timeout":
            self.rec.flag("UT")
            self.local(routing.LocalReply(504, b"upstream request timeout", "UT"))
            return
        flag = {"connect-failure": "UF", "reset": "UC", "refused-stream": "UR"}.get(outcome.failure, "UF")
        if outcome.failure == "":
            flag = "-"
        reason = {"UF": "connection failure", "UC": "connection termination", "UR": "remote reset"}.get(flag, "")
        self.local(routing.LocalReply(503, f"upstream connect error or disconnect/reset before headers. "
                                           f"reset reason: {reason}".encode(), flag))

    def _per_try_timeout(self) -> None:
        if self.done or self.endpoint is None or self.started:
            return
        ep = self.endpoint
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._attempt_over()
        self._judge(ep, Outcome(failure="timeout"), None)
        self.client.flush()

    def _route_timeout(self) -> None:
        if self.done:
            return
        d, state = self.decision, self.state
        self.rec.flag("UT")
        if self.endpoint is not None and state is not None and d.cluster is not None:
            if state.outlier is not None:
                state.outlier.record(self.endpoint.key, 504, self.hop.clock(), len(d.cluster.endpoints))
            self._attempt_over()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.started:
            self.client.close()
            self.finish()
        else:
            self.local(routing.LocalReply(504, b"upstream request timeout", "UT"))
        self.client.flush()

    # -- the response (`Forwarder._relay`, `_ServerExchange`) ------------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        ep = self.endpoint
        assert ep is not None and self.decision.request is not None
        self._attempt_over()
        status = grpc.status_of(head.headers) if grpc.is_grpc(self.decision.request) else None
        self._judge(ep, Outcome(status=head.status, grpc_status=status), head)

    def _relay_head(self, head: ResponseHead) -> None:
        headers = head.headers
        for ops in self.decision.response_ops:
            headers = routing.apply_ops(headers, ops)
        self.rec.status = head.status
        self._write_head(ResponseHead(head.status, headers))

    def response_data(self, data: bytes) -> None:
        self.rec.bytes_sent += len(data)
        self.client.write(self.writer.data(data))

    def response_end(self, conn: _Upstream) -> None:
        d, state, ep = self.decision, self.state, self.rec.upstream
        self._end()
        if self.deferred and state is not None and state.outlier is not None and d.cluster is not None \
                and ep is not None:  # (HTTP/1.1 has no trailers: the status of the head counts)
            state.outlier.record(ep.key, self.rec.status, self.hop.clock(), len(d.cluster.endpoints))
        self.conn = None
        self.hop.pool.release(conn)
        self.finish()

    def pause_upstream(self, paused: bool) -> None:
        if self.conn is not None:
            self.conn.pause(paused)

    def _write_head(self, head: ResponseHead, end: bool = False) -> None:
        """`_ServerExchange.send_head`: the head framed for this client (the body's framing chosen)."""
        self.started = True
        client = self.client
        headers = forwardable(head.headers)
        status = head.status
        self.writer, extra, reusable = response_framing(self.method, status, headers, client.version)
        client.keep_alive = client.keep_alive and reusable
        if not client.keep_alive:
            extra += (("connection", "close"),)
        client.write(_head_bytes(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n",
                                 headers + extra if extra else headers))
        if end:
            self._end()

    def _end(self) -> None:
        tail, reusable = self.writer.end()
        self.client.keep_alive = self.client.keep_alive and reusable
        self.client.write(tail)

    def local(self, reply: routing.LocalReply) -> None:
        """`send_local`: the waypoint's own answer (a trailers-only one to a gRPC request), then the end."""
        rec = self.rec
        if reply.flag != "-":
            rec.flag(reply.flag)
        try:
            if grpc.is_grpc(self.received):
                rec.status = 200
                headers = (*grpc.local_reply_headers(reply.status, reply.body.decode("utf-8", "replace"),
                                                     reply.grpc_status), *reply.headers)
                self._write_head(ResponseHead(200, headers), end=True)
            else:
                rec.status = reply.status
                self._write_head(ResponseHead(reply.status, (("content-length", str(len(reply.body))),
                                                             ("content-type", "text/plain"), *reply.headers)))
                if reply.body:
                    self.client.write(self.writer.data(reply.body))
                self._end()
                rec.bytes_sent += len(reply.body)
        except _LocalError:
            self.client.close()
        self.finish()

    def refused(self, status: int, message: str) -> None:
        """Bad HTTP from the client (`HttpError`): refused and closed when no answer has begun."""
        if not self.started:
            self.client.refuse(status, message)
        else:
            self.client.close()
        self.finish()

    # -- the end ------------------------------------------------------------------------------------------

    def client_lost(self) -> None:
        if self.done:
            return
        self.rec.flag("DC")
        if self.endpoint is not None:
            self._attempt_over()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.finish()

    def finish(self) -> None:
        """Once: the answer out, the limiter's slot back, the outcome recorded (`WaypointProxy._report`)."""
        if self.done:
            return
        self.done = True
        self.client.flush()
        for timer in (self.route_timer, self.try_timer, self.wait_timer):
            if timer is not None:
                timer.cancel()
        if self.retrying and self.state is not None:
            self.state.limiter.retry_done()
        if self.limited and self.state is not None:
            self.state.limiter.release()
        if self.span is not None:  # (None: refused before the pipeline began; the trio path records nothing)
            self.hop.proxy._report(self.table, self.head, self.client.info, self.decision, self.rec, self.authn,
                                   self.verdict, self.start_time, self.wall, self.span)
        self.client.finished()


# ---- the upstream side -----------------------------------------------------------------------------------

class _Upstream(asyncio.Protocol):
    """One connection to an endpoint, one request at a time (`Http1Client`)."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, PoolKey]) -> None:
        self.pool = pool
        self.key = key
        self.reader = _Reader(False, pool.max_header_bytes)
        self.phase = UpPhase.IDLE
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.keep_alive = True
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not its subclasses)

    @property
    def reusable(self) -> bool:
        return self.phase is UpPhase.IDLE and self.keep_alive and not self.reader.broken and not self.reader.events

    def send_request(self, ex: _Exchange, head: RequestHead, body: list[bytes], reused: bool) -> None:
        """`Http1Client.send_request` for a body that is all here."""
        headers = (("host", head.authority), *forwardable(head.headers))
        length = _content_length(headers)
        self.reader.skip_body = head.method in _NO_BODY_METHODS
        chunks = [c for c in body if c]
        if length is None:
            writer = _Writer(_CHUNKED) if chunks else _Writer(_NONE)
            if chunks:
                headers = (*headers, ("transfer-encoding", "chunked"))
        else:
            writer = _Writer(_LENGTH, length)
        data = _head_bytes(f"{head.method} {head.path} HTTP/1.1\r\n", headers)
        out = [data, *(writer.data(c) for c in chunks)]
        tail, reusable = writer.end()
        out.append(tail)
        self.keep_alive = self.keep_alive and reusable
        self.exchange = ex
        self.reused = reused
        self.phase = UpPhase.WAITING
        assert self.transport is not None
        self.transport.write(b"".join(out) if len(out) > 1 else data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self._events()

    def _events(self) -> None:
        events = self.reader.events
        ex = None
        while events and self.exchange is not None:
            ex = self.exchange
            event = events.popleft()
            if isinstance(event, _Head):
                if 100 <= event.status < 200 and event.status != 101:
                    continue  # an informational answer: its end follows at once, skipped below
                self.keep_alive = self.keep_alive and event.keep_alive and not event.upgrade
                self.phase = UpPhase.RECEIVING
                ex.response_head(ResponseHead(event.status, event.headers))
            elif isinstance(event, _Data):
                if self.phase is UpPhase.RECEIVING:
                    ex.response_data(event.data)
            elif event is _END:
                if self.phase is UpPhase.RECEIVING:
                    self.phase = UpPhase.IDLE
                    self.exchange = None
                    ex.response_end(self)
            elif isinstance(event, _Bad):
                self._lost(ex, UpstreamReset(f"endpoint sent malformed HTTP: {event.message}"))
            else:
                self._lost(ex, UpstreamReset("endpoint closed the connection before answering"
                                             if self.phase is UpPhase.WAITING else
                                             "endpoint closed the connection in the middle of the response"))
        if ex is not None:  # (a response that ended went out with its `finish`)
            ex.client.flush()

    def eof_received(self) -> bool:
        self.reader.closed()
        self._events()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        ex = self.exchange
        if ex is not None and self.phase is not UpPhase.CLOSED:
            self._lost(ex, UpstreamReset(f"connection to endpoint reset: {exc}" if exc else
                                         "endpoint closed the connection before answering"))
            ex.client.flush()
        self.phase = UpPhase.CLOSED

    def _lost(self, ex: _Exchange, error: UpstreamReset) -> None:
        self.exchange = None
        self.phase = UpPhase.CLOSED
        if self.transport is not None:
            self.transport.close()
        if ex.conn is self:
            ex.upstream_lost(error, self.reused)

    def pause(self, paused: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def close(self) -> None:
        self.exchange = None
        self.phase = UpPhase.CLOSED
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per (protocol, (endpoint, client address, service)), as
    `ConnectionPool` keeps its HTTP/1.1 ones; a dial is the one task of the hop."""

    def __init__(self, hop: AsyncioHop, idle_timeout: float = 60.0, max_idle: int = MAX_IDLE_PER_KEY) -> None:
        self.hop = hop
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_header_bytes = hop.proxy.settings.max_header_bytes
        self._idle: dict[tuple[str, PoolKey], list[tuple[float, _Upstream]]] = {}
        self._next_expiry = 0.0
        self.opened = 0

    def acquire(self, endpoint: Endpoint, protocol: str, service: str, client: str) -> _Upstream | None:
        idle = self._idle.get((protocol, (endpoint.key, client, service)))
        if idle:
            now = self.hop.clock()
            while idle:
                since, conn = idle.pop()
                if now - since < self.idle_timeout and conn.phase is UpPhase.IDLE:
                    return conn
                conn.close()
        return None

    def dial(self, endpoint: Endpoint, protocol: str, service: str, client: str, connect_timeout: float,
             ex: _Exchange) -> None:
        key = (protocol, (endpoint.key, client, service))
        self.hop.loop.create_task(self._dial(endpoint, key, connect_timeout, ex))

    async def _dial(self, endpoint: Endpoint, key: tuple[str, PoolKey], connect_timeout: float,
                    ex: _Exchange) -> None:
        loop = self.hop.loop
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(lambda: _Upstream(self, key), endpoint.address, endpoint.port)
        except TimeoutError:
            ex.dial_failed(ConnectFailure(f"connection to {endpoint.key} timed out after {connect_timeout:g}s"))
            return
        except OSError as exc:
            ex.dial_failed(ConnectFailure(f"cannot connect to {endpoint.key}: {exc.strerror or exc}"))
            return
        self.opened += 1
        ex.send_on(conn, reused=False)
        ex.client.flush()

    def release(self, conn: _Upstream) -> None:
        if conn.reusable:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle:
                idle.append((self.hop.clock(), conn))
                return
        conn.close()

    def expire(self, now: float) -> None:
        """Every quarter of `idle_timeout`, as `ConnectionPool.run`: close what has been idle longer."""
        if now < self._next_expiry:
            return
        self._next_expiry = now + self.idle_timeout / 4
        for key, idle in list(self._idle.items()):
            keep = []
            for since, conn in idle:
                if now - since >= self.idle_timeout or conn.phase is UpPhase.CLOSED:
                    conn.close()
                else:
                    keep.append((since, conn))
            if keep:
                idle[:] = keep
            else:
                del self._idle[key]


# ---- over HBONE: the hop between two of the engine's tunnels --------------------------------------------

class TunnelTransport:
    """An engine tunnel (`mesh.hbone.aio.TunnelEnd`) as the transport of one of the hop's protocols
    (`_Client`, `_Upstream`): it stands where a `Splice` stands at the end (what the tunnel receives goes to
    the protocol's callbacks, from the callback that received it) and where the transport stands for the
    protocol (what it writes goes on the stream).  `extra` answers `get_extra_info` (`peername`: what
    `AsyncioHop.client_for` reads)."""

    def __init__(self, end: TunnelEnd, protocol: asyncio.Protocol, extra: dict[str, Any]) -> None:
        self.end = end
        self.protocol = protocol
        self.extra = extra
        self.closed = False  # by either side: nothing more is written or delivered; `connection_lost` is due
        self.paused = False  # the protocol was told to stop writing (the stream's window or the connection full)
        protocol.connection_made(cast(asyncio.BaseTransport, self))
        end.attach(cast(Splice, self), 0)

    # -- what the end calls (as it calls a splice) --------------------------------------------------------

    def data(self, side: int, data: bytes | memoryview) -> None:
        if not self.closed:
            self.protocol.data_received(data if type(data) is bytes else bytes(data))

    def ended(self, side: int) -> None:
        if not self.closed and not self.protocol.eof_received():
            self.close()

    def failed(self, side: int, reason: str) -> None:
        if not self.closed:
            self.end.abort()
            self._lost(ConnectionResetError(reason))

    def drained(self, side: int) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.protocol.resume_writing()

    # -- the transport (what the protocol calls) ----------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        end = self.end
        end.write(data)
        if not end.writable and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.end.pause_reading()

    def resume_reading(self) -> None:
        self.end.resume_reading()

    def close(self) -> None:
        """END_STREAM after what was written; the stream is finished (reset if the peer still sends)."""
        if not self.closed:
            self.end.write_eof()
            self.end.close()
            self._lost(None)

    def abort(self) -> None:
        if not self.closed:
            self.end.abort()
            self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.end.conn.loop.call_soon(self.protocol.connection_lost, exc)  # (as a transport: never re-entrantly)


def admitted(peer: Any) -> ClientInfo:
    """`AsyncioHop.client_for` of a hop fed by tunnels: their `peername` is the admission's `ClientInfo`."""
    return cast(ClientInfo, peer)


def tunnel_handler(hop: AsyncioHop) -> AioHandler:
    """The hop's HBONE inbound on the engine (the handler of `mesh.hbone.aio.serve_tls`), as
    `waypoint.inbound.InboundServer.tunnel` without its allowance for configuration skew: `admit` (the same
    decision), then the tunnel read as a client connection (build the hop with `client_for=admitted`)."""
    async def handler(request: InboundRequest, acceptor: AioAcceptor) -> None:
        decision = admit(hop.proxy.table, request.authority, request.peer, request.forwarded_for,
                         request.peer_address)
        if isinstance(decision, Refusal):
            acceptor.reject(decision.status, decision.reason)
            return
        TunnelTransport(acceptor.accept(), _Client(hop), {"peername": decision})

    return handler


class TunnelPool(UpstreamPool):
    """The upstream pool over HBONE: a connection to an endpoint in the mesh is a tunnel on the engine's
    pool (`AioPool`), opened as `waypoint.upstream.connect.HboneUpstream` opens it (to the endpoint's
    address on `hbone_port`, its identity required, `Forwarded` naming the client and the service, the
    request's `traceparent`); one outside the mesh is plain TCP, as in `UpstreamPool`."""

    def __init__(self, hop: AsyncioHop, tunnels: AioPool, identity: SpiffeId, *,
                 trust_domain: str = defaults.TRUST_DOMAIN, hbone_port: int = HBONE_PORT) -> None:
        super().__init__(hop)
        self.tunnels = tunnels
        self.identity = identity
        self.trust_domain = trust_domain
        self.hbone_port = hbone_port

    async def _dial(self, endpoint: Endpoint, key: tuple[str, PoolKey], connect_timeout: float,
                    ex: _Exchange) -> None:
        if not endpoint.hbone:
            await super()._dial(endpoint, key, connect_timeout, ex)
            return
        _, (_, client, service) = key
        request = ex.decision.request
        headers = request_headers(forwarded_for=client or None, service_host=service or None,
                                  traceparent=(request.header("traceparent") if request else None) or None)
        try:
            where = HbonePoolKey(self.identity, endpoint_identity(endpoint, self.trust_domain),
                                 (endpoint.address, self.hbone_port))
            async with asyncio.timeout(connect_timeout):
                end = await self.tunnels.open_tunnel(where, endpoint.key, headers)
        except ConnectFailure as exc:
            ex.dial_failed(exc)
            return
        except TunnelRejected as exc:
            ex.dial_failed(ConnectFailure(f"{endpoint.key} ({endpoint.name or 'endpoint'}) refused the tunnel "
                                          f"with {exc.status}: {exc.reason or 'no reason given'}"))
            return
        except HboneError as exc:
            ex.dial_failed(ConnectFailure(f"HBONE to {endpoint.key}: {exc}"))
            return
        except TimeoutError:
            ex.dial_failed(ConnectFailure(f"HBONE to {endpoint.key} timed out after {connect_timeout:g}s"))
            return
        conn = _Upstream(self, key)
        TunnelTransport(end, conn, {"peername": (endpoint.address, endpoint.port)})
        self.opened += 1
        ex.send_on(conn, reused=False)
        ex.client.flush()


def serve(hop: AsyncioHop, host: str, port: int) -> None:
    """Run the hop on `hop.loop` until SIGINT."""
    loop = hop.loop
    server = loop.run_until_complete(hop.serve(host, port))
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
