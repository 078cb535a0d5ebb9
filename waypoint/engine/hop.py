"""The waypoint's HTTP/1.1 data path on the engine (asyncio Protocols on uvloop, `mesh.hbone.engine`).

It does per request what `waypoint.proxy.WaypointProxy` does on trio, with the same code wherever that code
is sans-IO, so that the two paths answer alike and only the engine and the task structure differ:

- parsing and writing HTTP/1.1: `waypoint.http.http1`'s reader over httptools, its head and body framing;
- the pipeline's steps: the proxy's own synchronous methods (`_sent_head`: forwarding headers,
  x-request-id, trace headers; `_upstream_protocol`; `_authz_request`; `_report`: metrics, span and the
  access-log line) on an `EngineProxy`, and the functions its `_handle` calls (`routing.target_hostname`,
  `normalize_request`, `routing.decide`, `jwt.authenticate`, `authz.decide`);
- forwarding: the `Forwarder`'s cluster state (balancer, outlier detector, limiter and its queue),
  `Record`, the retry and gRPC rules, and the response header operations, driven from callbacks.

Each tunnel the engine's HBONE inbound admits (`waypoint.engine.inbound`) is a client connection here
(`TunnelTransport` joins a protocol to a `mesh.hbone.aio.TunnelEnd`); upstream, `TunnelPool` opens tunnels
on the engine's HBONE pool as `waypoint.upstream.connect.HboneUpstream` does.  The only task is the dial of
a new upstream connection; everything else runs in the transports' callbacks: a request is routed and
written upstream from the client's `data_received`, the response goes to the client from the upstream's
`data_received` (its head with the body bytes that came with it, in one write), and the outcome is
recorded when the response has ended.  Retries (with backoff), per-try and route timeouts and fault delays
are timers armed only when the route has them; header, idle and detection timeouts and the upstream pool's
idle expiry are one sweep per second over all connections, not a timer per request.

A request that asks for a protocol upgrade (WebSocket) goes to the endpoint with its `Connection: upgrade`
and `Upgrade`; when the endpoint answers 101, the 101 goes to the client with them and both connections
switch to relaying bytes as they come, until both sides have ended (then the request is recorded, with
the bytes each way), as Envoy's upgrade does.  The trio path does not relay upgrades.

What this path does not do itself it hands over, with the connection, to the trio path (`handoff`: the
tunnel's bytes from the current request on, and the connection's later bytes, go to `WaypointProxy` on
trio, which serves the rest of the connection):
- a tunnel that is not HTTP/1.x: HTTP/2 (prior knowledge) and L4 passthrough (also when detection times
  out, as a server-first protocol's does);
- a CONNECT request;
- a request whose body is streamed: chunked, or longer than `retry_buffer_bytes` (a body up to that is
  read whole before the request is routed, as the trio path keeps it for retries);
- a request routed to mirrors, or to an endpoint port that speaks HTTP/2.
The hand-over takes the bytes of the connection as received since the current request began, so it is
exact whenever that request began a read of its own (a client that waits for each answer before its next
request: every HTTP/1.1 client but a pipelining one).  A pipelined request that needs the hand-over after
another in the same read is answered 503 with `Connection: close` and not forwarded, so the client may
send it again on a new connection.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import functools
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from typing import Protocol as TypingProtocol

from mesh import defaults
from mesh.bounded import BoundedMemo
from mesh.hbone.aio import TunnelEnd
from mesh.hbone.aiopool import AioPool
from mesh.hbone.config import HBONE_PORT
from mesh.hbone.engine import Engine
from mesh.hbone.errors import HboneError, TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey as HbonePoolKey
from mesh.hbone.splice import Splice
from mesh.identity import SpiffeId
from mesh.tracing.propagation import extract
from mesh.tracing.tracer import Started, Tracer
from waypoint.accesslog import Sink
from waypoint.config import RouteTable, pool_changes
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
from waypoint.l7 import authz, grpc, jwt, routing
from waypoint.l7.limits import Admission
from waypoint.l7.model import ClientInfo, Endpoint, RequestHead, ResponseHead, forwardable
from waypoint.l7.normalize import NormalizationError, normalize_request
from waypoint.l7.retry import Outcome, backoff, outcome_of, retriable
from waypoint.proxy import _NO_POLICY, _UNAUTHENTICATED, LABEL_CACHE_SIZE, WaypointProxy
from waypoint.upstream.connect import endpoint_identity
from waypoint.upstream.forward import ClusterState, Record, _available
from waypoint.upstream.pool import MAX_IDLE_PER_KEY, Changed, PoolKey, TcpUpstream

SWEEP_INTERVAL = 1.0  # seconds between sweeps for header, idle and detection timeouts
PAUSE_BYTES = 4 * READ_SIZE  # bytes a busy client may send ahead (pipelined) before its reading pauses
RETIRES_KEPT = 64  # route-table retires the upstream pool remembers for connections in use
STALE_TRIES = 3  # sends of one attempt on pooled connections found dead (as `Forwarder._attempt`)
ClientFor = Callable[[Any], ClientInfo]  # the transport's peer name -> who sent the tunnel
_UNDECIDED = routing.RouteDecision(None)  # (until `start` decides: what a request refused before it records)


class Phase(enum.Enum):
    """Of a client connection."""

    DETECTING = "detecting"  # its first bytes decide HTTP/1.x or not
    IDLE = "idle"  # waiting for a request's head
    BODY = "body"  # a request's head is in, its body is still arriving
    BUSY = "busy"  # the request is being answered
    TUNNEL = "tunnel"  # switched protocols (101): bytes relayed both ways as they come
    CLOSED = "closed"


class UpPhase(enum.Enum):
    """Of an upstream connection."""

    IDLE = "idle"  # no request, or the last exchange ended cleanly
    WAITING = "waiting"  # a request has gone out, its response head has not come
    RECEIVING = "receiving"  # the response's body is coming
    TUNNEL = "tunnel"  # switched protocols (101): bytes relayed both ways as they come
    CLOSED = "closed"


class Handoff(TypingProtocol):
    """Hands a client connection to the trio path: `client.transport` is given up, and the trio path
    serves `protocol` on it from `prefix` (the bytes received since the current request began) on; `eof`:
    the client has already ended its side after them."""

    def __call__(self, client: _Client, protocol: Protocol, prefix: bytes, eof: bool) -> None: ...


def close_instead(client: _Client, protocol: Protocol, prefix: bytes, eof: bool) -> None:
    """A `Handoff` for a hop with no trio path behind it (benchmarks, tests of the hop alone): the
    connection is closed."""
    client.close()


class EngineProxy(WaypointProxy):
    """The proxy's state and steps as the engine's thread uses them.  The route table, the JWKS cache (read
    here, fetched by trio's proxy), the settings, the metrics (thread-safe) and the tracer are trio's
    proxy's; the state that requests change (the clusters' balancers, limiters and outlier detectors, the
    memos, the random source) is the engine's own, as each worker process has its own.  `update` swaps
    the table and retires the engine's upstream connections it changed (`on_retire`)."""

    def __init__(self, proxy: WaypointProxy, *, clock: Callable[[], float] = time.monotonic,
                 tracer: Tracer | TracerOnTrio | None = None, access_log: Sink | None = None) -> None:
        self.on_retire: Callable[[Changed], None] | None = None
        super().__init__(TcpUpstream(), proxy.table, settings=proxy.settings, metrics=proxy.metrics,
                         access_log=access_log or proxy.access_log, clock=clock, jwks=proxy.jwks,
                         identity=proxy.identity, tracer=cast(Tracer, tracer or proxy.tracer))

    def update(self, table: RouteTable) -> None:
        old, self._table = self._table, table
        self._labels = BoundedMemo(LABEL_CACHE_SIZE)
        self._clusters = BoundedMemo(routing.CLUSTER_CACHE_SIZE)
        self._protocols = BoundedMemo(LABEL_CACHE_SIZE)
        if self.on_retire is not None:
            self.on_retire(pool_changes(old, table))


class TracerOnTrio:
    """A `Tracer` for the engine's thread: spans start here (ids and sampling only) and are finished on
    trio's thread, where the exporter's queue lives (`Engine.to_trio_soon`)."""

    def __init__(self, tracer: Tracer, engine: Engine) -> None:
        self.tracer = tracer
        self.engine = engine
        self.start = tracer.start

    @property
    def exporting(self) -> bool:
        return self.tracer.exporting

    def finish(self, started: Started, *args: Any, **kwargs: Any) -> None:
        if started.recording:
            self.engine.to_trio_soon(functools.partial(self.tracer.finish, started, *args, **kwargs))


class EngineHop:
    """What the engine's client connections share: the proxy, the upstream pool, the sweep, the drain."""

    def __init__(self, proxy: WaypointProxy, loop: asyncio.AbstractEventLoop, client_for: ClientFor,
                 handoff: Handoff = close_instead) -> None:
        self.proxy = proxy
        self.loop = loop
        self.clock = proxy.clock
        self.client_for = client_for
        self.handoff = handoff
        self.pool: UpstreamPool = UpstreamPool(self)
        self.clients: set[_Client] = set()
        self.draining = False
        self.handed = 0  # connections handed to the trio path (since start)
        self._sweeper: asyncio.TimerHandle | None = None
        if isinstance(proxy, EngineProxy):
            proxy.on_retire = lambda changed: self.pool.retire(changed)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """A plain TCP listener whose connections are clients (benchmarks and tests of the hop)."""
        server = await self.loop.create_server(lambda: _Client(self), host, port, reuse_address=True)
        self.start()
        return server

    def start(self) -> None:
        """Arm the sweep (`serve` does; a hop fed by HBONE tunnels calls it itself)."""
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def take_tunnel(self, end: TunnelEnd, client: ClientInfo) -> None:
        """An admitted tunnel (its CONNECT answered 200) is a client connection from now on."""
        TunnelTransport(end, _Client(self), {"peername": client})

    def drain(self) -> None:
        """The waypoint is going (`WaypointProxy.drain`): the next response on each connection says
        `Connection: close` and the connection closes after it."""
        self.draining = True

    def _sweep(self) -> None:
        now = self.clock()
        for client in list(self.clients):
            if client.phase in (Phase.IDLE, Phase.DETECTING) and now >= client.deadline:
                client.timed_out()
        self.pool.expire(now)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)


# ---- the client side ------------------------------------------------------------------------------------

class _Client(asyncio.Protocol):
    """One client connection (a tunnel): its requests one after the other, keep-alive, as `Http1Server`.

    While a request is answered, what the client sends next waits unparsed (`_held`), so that the next
    request begins a read of its own and the connection can be handed over from it (`_raw`)."""

    def __init__(self, hop: EngineHop) -> None:
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
        self.peer: _Upstream | None = None  # (tunnel) the endpoint's connection the bytes go to
        self._ended = False  # (tunnel) the client has ended its side
        self._eof_sent = False  # (tunnel) the endpoint's end has been passed on to the client
        self._prefix = b""
        self._raw: list[bytes] = []  # what was received since the current request began (when `_aligned`)
        self._aligned = True  # the current request began a read: `_raw` starts with it
        self._held: list[bytes] = []  # received while busy, not parsed yet
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
        if self.phase is Phase.TUNNEL:
            peer = self.peer
            if peer is not None and peer.transport is not None:
                peer.transport.write(data)
                if self.exchange is not None:
                    self.exchange.rec.bytes_received += len(data)
            return
        if self.phase is Phase.DETECTING:
            data = self._prefix + data
            verdict = sniff(data)
            if verdict is Protocol.UNDECIDED:
                self._prefix = data
                return
            self._prefix = b""
            if verdict is not Protocol.HTTP1:
                self._hand_off(verdict, data)
                return
            self._idle()
        elif self.phase is Phase.BUSY or self.phase is Phase.CLOSED:
            if self.phase is Phase.BUSY:
                self._held.append(data)
                self._ahead += len(data)
                if self._ahead > PAUSE_BYTES and self.transport is not None:
                    self.transport.pause_reading()
            return
        self._feed(data)
        self._pump()
        self.flush()

    def _feed(self, data: bytes) -> None:
        if self._aligned:
            self._raw.append(data)
        self.reader.feed(data)
        if self.phase is Phase.IDLE and not self.reader.events and self.reader.in_head and not self._head_begun:
            self._head_begun = True  # the rest of the head within `header_timeout`
            self.deadline = self.hop.clock() + self.settings.header_timeout

    def eof_received(self) -> bool:
        if self.phase is Phase.TUNNEL:
            self._ended = True
            if self.exchange is not None:
                self.exchange.tunnel_ended()
            return True
        if self.phase is Phase.DETECTING:  # (nothing, or too little to tell: not HTTP/1.x)
            if self._prefix:
                self._hand_off(Protocol.OPAQUE, self._prefix, eof=True)
                return True
            self.close()
            return True
        if self.phase is Phase.BUSY:
            self._held.append(b"")  # (the end, after what was held)
            return True
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

    def switch(self, peer: _Upstream) -> bytes:
        """Switched protocols: from now on bytes go to `peer` as they come.  Returns what the client sent
        after its request meanwhile (and ends towards the endpoint if the client has ended)."""
        self.phase = Phase.TUNNEL
        self.peer = peer
        ahead = self.reader.upgraded
        self.reader.upgraded = b""
        for data in self._held:
            if data:
                ahead += data
            else:
                self._ended = True
        self._held = []
        if self._ahead > PAUSE_BYTES and self.transport is not None:
            self.transport.resume_reading()
        self._ahead = 0
        return ahead

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
        if self.phase is Phase.DETECTING:  # (a client that waits for the server to speak first)
            self._hand_off(Protocol.OPAQUE, self._prefix)
        elif self.phase is Phase.IDLE and self.reader.in_head:
            self.refuse(408, "request headers did not arrive in time")
        else:
            self.close()

    # -- the hand-over to the trio path ----------------------------------------------------------------

    def _hand_off(self, protocol: Protocol, prefix: bytes, *, eof: bool = False) -> None:
        """The connection, from `prefix` on, to the trio path (`Handoff`); this protocol is done with it."""
        self.flush()
        self.hop.clients.discard(self)
        self.phase = Phase.CLOSED
        self.hop.handed += 1
        self.hop.handoff(self, protocol, prefix, eof)

    def hand_off_request(self, why: str) -> bool:
        """The current request (and the rest of the connection) to the trio path, when this request began
        a read of its own; otherwise 503 and the close (a pipelined request: not forwarded, so it can be
        sent again).  True when handed over."""
        if not self._aligned:
            self.keep_alive = False
            return False
        held = [d for d in self._held if d]
        eof = len(held) != len(self._held)
        self._held = []
        self.exchange = None
        self._hand_off(Protocol.HTTP1, b"".join(self._raw) + b"".join(held), eof=eof)
        return True

    # -- requests --------------------------------------------------------------------------------------

    def _idle(self) -> None:
        self.phase = Phase.IDLE
        self.deadline = self.hop.clock() + self.settings.idle_timeout
        self._head_begun = False
        reader = self.reader
        self._aligned = not reader.events and not reader.in_head and not reader.in_body
        self._raw = []
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
        why = self._not_here(event)
        if why:
            if not self.hand_off_request(why):
                self.refuse(503, f"this pipelined request needs a connection of its own ({why}): "
                                 "send it again on a new connection")
            return
        self.phase = Phase.BODY
        self.exchange = _Exchange(self, _request_head(event), event.method)
        if event.upgrade:  # (nothing is parsed after it: the connection ends with it unless it switches)
            self.keep_alive = False
            self.exchange.upgrade = next((v for k, v in event.headers if k == "upgrade"), "")

    def _not_here(self, event: _Head) -> str:
        """Why the request is the trio path's ("" when it is this path's)."""
        if event.method == "CONNECT":
            return "a CONNECT"
        length = None
        for name, value in event.headers:
            if name == "transfer-encoding":
                return "a streamed body"
            if name == "content-length":
                length = value
        if length is not None and (not length.isdigit() or int(length) > self.hop.proxy.settings.retry_buffer_bytes):
            return "a streamed body"  # (or a malformed length: the trio path answers it)
        return ""

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
        if not self.keep_alive:
            self.close()
            return
        self._idle()
        self._pump()  # what came in the same reads as the request just answered (pipelined), parsed already
        held, self._held = self._held, []
        for data in held:
            if self.phase is not Phase.IDLE and self.phase is not Phase.BODY:
                if self.phase is Phase.BUSY:
                    self._held.append(data)  # (the next request is busy already: the rest waits again)
                continue
            if data:
                self._feed(data)
            else:
                self.reader.closed()
            self._pump()
        self.flush()


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
        self.upgrade = ""  # the protocol the client asks to switch to (its `Upgrade`), "" for none
        self.waiter: _Waiter | None = None  # in the limiter's queue
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
        if d.cluster is not None and d.request is not None and d.local_reply is None \
                and (d.mirrors or proxy._upstream_protocol(table, d) != "HTTP/1.1"):
            self._not_here("mirrors" if d.mirrors else "an HTTP/2 endpoint")
            return
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

    def _not_here(self, why: str) -> None:
        """The route needs what the trio path does: the connection goes there from this request on."""
        if self.client.hand_off_request(why):
            self.done = True
            return
        self.local(routing.LocalReply(503, f"this pipelined request needs a connection of its own ({why}): "
                                           "send it again on a new connection".encode()))

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
        self._forward()

    # -- forwarding (`Forwarder.forward`, `_attempts`, `_attempt`) -------------------------------------

    def _forward(self) -> None:
        d = self.decision
        assert d.cluster is not None and d.request is not None
        state = self.state = self.hop.proxy.forwarder.state(d.cluster)
        admission = state.limiter.admit()
        if admission is Admission.OVERFLOW:
            self.rec.flag("UO")
            self.local(routing.LocalReply(503, b"upstream connect error or disconnect/reset before headers. "
                                               b"reset reason: overflow", "UO"))
            return
        if admission is Admission.QUEUE:  # a slot is handed over by `release`, in the queue's order
            self.waiter = _Waiter(self)
            state.limiter.enqueue(self.waiter)
            return
        state.limiter.active += 1  # (what `ClusterLimiter.acquire` does when it admits at once)
        self._admitted()

    def granted(self) -> None:
        """The limiter handed this request a slot (it waited in the queue)."""
        self.waiter = None
        if self.done:
            assert self.state is not None
            self.state.limiter.release()  # (gone meanwhile: the slot goes on to the next)
            return
        self._admitted()
        self.client.flush()

    def _admitted(self) -> None:
        d = self.decision
        assert d.request is not None
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

    def switched(self, conn: _Upstream, head: ResponseHead, rest: bytes) -> None:
        """The endpoint switched protocols (101) for an upgrade request: the 101 to the client with its
        `Connection: upgrade` and `Upgrade`, then bytes both ways as they come (`_Client.switch`)."""
        ep = self.endpoint
        assert ep is not None and self.state is not None and self.decision.cluster is not None
        self._attempt_over()
        if self.state.outlier is not None:
            self.state.outlier.record(ep.key, 101, self.hop.clock(), len(self.decision.cluster.endpoints))
        if self.route_timer is not None:  # (the route's timeout is for an answer; a tunnel has none)
            self.route_timer.cancel()
            self.route_timer = None
        headers = head.headers
        for ops in self.decision.response_ops:
            headers = routing.apply_ops(headers, ops)
        protocol = next((v for k, v in head.headers if k == "upgrade"), self.upgrade)
        self.rec.status = 101
        self.started = True
        client = self.client
        client.write(_head_bytes("HTTP/1.1 101 Switching Protocols\r\n",
                                 (*forwardable(headers), ("connection", "upgrade"), ("upgrade", protocol))))
        if rest:
            self.rec.bytes_sent += len(rest)
            client.write(rest)
        client.flush()
        ahead = client.switch(conn)
        if ahead and conn.transport is not None:
            self.rec.bytes_received += len(ahead)
            conn.transport.write(ahead)
        self.tunnel_ended()

    def tunnel_ended(self) -> None:
        """One side of a switched connection may have ended: its end passed on; both: the exchange is over."""
        client, conn = self.client, self.conn
        if conn is None or self.done:
            return
        if client._ended and not conn.eof_sent and conn.transport is not None:
            conn.eof_sent = True
            if conn.transport.can_write_eof():
                conn.transport.write_eof()
        if conn.ended and not client._eof_sent and client.transport is not None:
            client._eof_sent = True
            if client.transport.can_write_eof():
                client.transport.write_eof()
        if client._ended and conn.ended:
            self.conn = None
            conn.close()
            client.close()
            self.finish()

    def _write_head(self, head: ResponseHead, end: bool = False) -> None:
        """`_ServerExchange.send_head`: the head framed for this client (the body's framing chosen)."""
        self.started = True
        client = self.client
        headers = forwardable(head.headers)
        status = head.status
        self.writer, extra, reusable = response_framing(self.method, status, headers, client.version)
        client.keep_alive = client.keep_alive and reusable and not self.hop.draining
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
        if self.waiter is not None and self.state is not None and not self.waiter.handed:
            self.state.limiter.withdraw(self.waiter)
        if self.span is not None:  # (None: refused before the pipeline began; the trio path records nothing)
            self.hop.proxy._report(self.table, self.head, self.client.info, self.decision, self.rec, self.authn,
                                   self.verdict, self.start_time, self.wall, self.span)
        self.client.finished()


class _Waiter:
    """A request's place in its cluster's limiter queue (`ClusterLimiter.enqueue`): `set` is the slot."""

    __slots__ = ("exchange", "handed")

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.handed = False

    def set(self) -> None:
        self.handed = True
        self.exchange.hop.loop.call_soon(self.exchange.granted)


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
        self.ended = False  # (tunnel) the endpoint has ended its side
        self.eof_sent = False  # (tunnel) the client's end has been passed on to the endpoint
        self.born = pool.generation  # the pool's retires before this one do not concern it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not its subclasses)

    @property
    def reusable(self) -> bool:
        return self.phase is UpPhase.IDLE and self.keep_alive and not self.reader.broken and not self.reader.events

    def send_request(self, ex: _Exchange, head: RequestHead, body: list[bytes], reused: bool) -> None:
        """`Http1Client.send_request` for a body that is all here."""
        headers = (("host", head.authority), *forwardable(head.headers))
        if ex.upgrade:  # (hop-by-hop, but what an upgrade asks of the next hop)
            headers = (*headers, ("connection", "upgrade"), ("upgrade", ex.upgrade))
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
        if self.phase is UpPhase.TUNNEL:
            ex = self.exchange
            if ex is not None and ex.client.transport is not None and ex.client.phase is Phase.TUNNEL:
                ex.rec.bytes_sent += len(data)
                ex.client.transport.write(data)
            return
        self.reader.feed(data)
        self._events()

    def pause_writing(self) -> None:
        ex = self.exchange
        if self.phase is UpPhase.TUNNEL and ex is not None and ex.client.transport is not None:
            ex.client.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        if self.phase is UpPhase.TUNNEL and ex is not None and ex.client.transport is not None:
            ex.client.transport.resume_reading()

    def _events(self) -> None:
        events = self.reader.events
        ex = None
        while events and self.exchange is not None:
            ex = self.exchange
            event = events.popleft()
            if isinstance(event, _Head):
                if event.status == 101 and event.upgrade and ex.upgrade and self.phase is UpPhase.WAITING:
                    self.phase = UpPhase.TUNNEL
                    self.keep_alive = False
                    events.clear()
                    rest, self.reader.upgraded = self.reader.upgraded, b""
                    ex.switched(self, ResponseHead(101, event.headers), rest)
                    return
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
        if self.phase is UpPhase.TUNNEL:
            self.ended = True
            if self.exchange is not None:
                self.exchange.tunnel_ended()
            return True
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
    `ConnectionPool` keeps its HTTP/1.1 ones; a dial is the one task of the hop.  `retire` (a new route
    table) closes the idle connections of the keys it names, and those in use or being opened when they
    are given back, as `ConnectionPool.retire` does."""

    def __init__(self, hop: EngineHop, idle_timeout: float = 60.0, max_idle: int = MAX_IDLE_PER_KEY) -> None:
        self.hop = hop
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_header_bytes = hop.proxy.settings.max_header_bytes
        self._idle: dict[tuple[str, PoolKey], list[tuple[float, _Upstream]]] = {}
        self._next_expiry = 0.0
        self.opened = 0
        self.generation = 0  # retires so far
        self._retires: deque[Changed] = deque(maxlen=RETIRES_KEPT)  # the last ones, oldest first

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

    def idle_count(self) -> int:
        """(Read from trio's thread too: a snapshot of the lists first.)"""
        return sum(map(len, list(self._idle.values())))

    def retire(self, changed: Changed) -> None:
        for key, idle in list(self._idle.items()):
            if changed(key[1][0], key[1][2]):
                for _, conn in idle:
                    conn.close()
                del self._idle[key]
        self.generation += 1
        self._retires.append(changed)

    def _retired(self, conn: _Upstream) -> bool:
        """Whether a retire since `conn` was opened named its key."""
        since = self.generation - conn.born
        if since == 0:
            return False
        if since > len(self._retires):
            return True  # (older than the retires kept: not reused, to be sure)
        _, (endpoint, _, service) = conn.key
        return any(changed(endpoint, service) for changed in list(self._retires)[-since:])

    def release(self, conn: _Upstream) -> None:
        if conn.reusable and not self._retired(conn):
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
    `EngineHop.client_for` reads)."""

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

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """END_STREAM after what was written; the other direction goes on."""
        if not self.closed:
            self.end.write_eof()

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

    def detach(self) -> TunnelEnd:
        """Give the tunnel up, open, to whoever joins it next (the protocol hears nothing more)."""
        self.closed = True
        self.end.detach()
        return self.end

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.end.conn.loop.call_soon(self.protocol.connection_lost, exc)  # (as a transport: never re-entrantly)


def admitted(peer: Any) -> ClientInfo:
    """`EngineHop.client_for` of a hop fed by tunnels: their `peername` is the admission's `ClientInfo`."""
    return cast(ClientInfo, peer)


class TunnelPool(UpstreamPool):
    """The upstream pool over HBONE: a connection to an endpoint in the mesh is a tunnel on the engine's
    pool (`AioPool`), opened as `waypoint.upstream.connect.HboneUpstream` opens it (to the endpoint's
    address on `hbone_port`, its identity required, `Forwarded` naming the client and the service, the
    request's `traceparent`); one outside the mesh is plain TCP, as in `UpstreamPool`."""

    def __init__(self, hop: EngineHop, tunnels: AioPool, identity: SpiffeId, *,
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
