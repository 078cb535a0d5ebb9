"""Forwarding one routed request: the request body (streamed, and kept for retries), attempts with
retries and timeouts, the endpoint choice (load balancer, outlier detection, pool limits) and relaying
the response.  To an HTTP/2 endpoint the request body goes out beside the response, frame by frame, so
gRPC client-, server- and bidirectional streams pass through; trailers pass both ways; gRPC requests
get gRPC answers from the waypoint itself (`send_local`) and gRPC retry conditions (`waypoint.l7.grpc`).

`Forwarder.forward` is the I/O half of a `RouteDecision`; it reports what happened into a `Record` that
the proxy turns into metrics and an access-log line.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from waypoint.errors import HttpError, UpstreamError, UpstreamReset
from waypoint.http.exchange import ServerExchange, TrailerExchange, UpstreamConnection
from waypoint.http.http2_client import Http2Stream, NotProcessed
from waypoint.l7 import grpc
from waypoint.l7.lb import Balancer
from waypoint.l7.limits import ClusterLimiter
from waypoint.l7.model import Endpoint, Headers, ResponseHead, forwardable
from waypoint.l7.outlier import OutlierDetector
from waypoint.l7.retry import Outcome, backoff, outcome_of, retriable
from waypoint.l7.routing import Cluster, LocalReply, RouteDecision, apply_ops
from waypoint.l7.rules import TrafficPolicy
from waypoint.upstream.pool import ConnectionPool


@dataclass
class Record:
    """What happened to one request, filled in along the pipeline."""

    status: int = 0
    flags: list[str] = field(default_factory=list)
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream: Endpoint | None = None
    attempts: int = 0
    details: str = ""

    def flag(self, f: str) -> None:
        if f not in self.flags:
            self.flags.append(f)

    @property
    def flag_text(self) -> str:
        return ",".join(self.flags) or "-"


class RequestBody:
    """The request body, streamed to the endpoint as it arrives and kept, up to `bound` bytes, so that it
    can be sent again on retry; a larger body is sent once (and the request is not retried).  `trailers`
    gives the request's trailers once the body has ended (HTTP/2).

    While attempts run, `pump` is the one reader of the client's body: it reads a chunk when an attempt
    asks for one, so an attempt that is given up never cuts a read short and the next attempt carries on
    where the body stands (what is kept, then the rest), and the client is read no faster than the
    endpoint takes it."""

    def __init__(self, source: AsyncIterator[bytes], bound: int, record: Record,
                 trailers: Callable[[], Headers] = lambda: ()) -> None:
        self._source = source
        self._bound = bound
        self._record = record
        self._trailers = trailers
        self._kept: list[bytes] = []  # chunks read, from number `_offset` on (after an overflow: the unsent)
        self._offset = 0
        self._size = 0
        self.complete = False  # the client's body has ended
        self.overflowed = False  # more than `bound`: the body can go out only once
        self.started = False  # some attempt has asked for it
        self._streamed = False  # an overflowed body has begun to go out
        self._error: HttpError | None = None
        self._demand = trio.Event()
        self._arrived = trio.Event()
        self._on_complete: list[Callable[[], None]] = []

    @property
    def buffered(self) -> bytes:
        return b"".join(self._kept)

    @property
    def replayable(self) -> bool:
        """The whole body is kept: another attempt can send it again."""
        return self.complete and not self.overflowed

    @property
    def resendable(self) -> bool:
        """Another attempt can send the body: it is within the bound, or no attempt has asked for it yet."""
        return not self.overflowed or not self.started

    @property
    def trailers(self) -> Headers:
        return self._trailers() if self.complete else ()

    def when_complete(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the client's body has ended (at once if it has)."""
        if self.complete:
            callback()
        else:
            self._on_complete.append(callback)

    async def prepare(self) -> None:
        """Read ahead until the body ends or passes the bound (what mirrors need before they start)."""
        while not self.complete and not self.overflowed:
            await self._read()

    async def pump(self) -> None:
        """Read the client's body as attempts ask for it, until it ends (run beside the attempts)."""
        try:
            while not self.complete:
                await self._demand.wait()
                self._demand = trio.Event()
                await self._read()
                self._arrived.set()
                self._arrived = trio.Event()
        except HttpError as exc:
            self._error = exc
            self._arrived.set()

    async def _read(self) -> None:
        try:
            chunk = await self._source.__anext__()
        except StopAsyncIteration:
            self.complete = True
            for callback in self._on_complete:
                callback()
            self._on_complete.clear()
            return
        self._record.bytes_received += len(chunk)
        self._kept.append(chunk)
        self._size += len(chunk)
        if self._size > self._bound:
            self.overflowed = True

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body for one attempt: what is kept, then the rest as the client sends it."""
        if self._streamed:
            raise HttpError(500, "request body already sent")
        self.started = True
        index = self._offset
        while True:
            if index - self._offset < len(self._kept):
                chunk = self._kept[index - self._offset]
                index += 1
                if self.overflowed:  # sent once: nothing more is kept of it
                    self._streamed = True
                    self._kept = self._kept[index - self._offset:]
                    self._offset = index
                yield chunk
            elif self.complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                arrived = self._arrived
                self._demand.set()
                await arrived.wait()


class ClusterState:
    """Balancer, outlier detector and limiter of one cluster, kept across configuration changes while
    its traffic policy stays the same."""

    def __init__(self, policy: TrafficPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.balancer = Balancer(rng)
        self.outlier = OutlierDetector(policy.outlier) if policy.outlier else None
        self.limiter = ClusterLimiter(policy.limits)


@dataclass
class _Response:
    head: ResponseHead
    conn: UpstreamConnection
    protocol: str


@dataclass
class _InFlight:
    """The endpoint whose answer the current attempt awaits (what a route timeout counts against)."""

    endpoint: Endpoint | None = None


class Forwarder:
    def __init__(self, pool: ConnectionPool, clock: Callable[[], float], rng: random.Random) -> None:
        self.pool = pool
        self.clock = clock
        self.rng = rng
        self.clusters: dict[str, ClusterState] = {}

    def state(self, cluster: Cluster) -> ClusterState:
        s = self.clusters.get(cluster.key)
        if s is None or s.policy != cluster.policy:
            s = self.clusters[cluster.key] = ClusterState(cluster.policy, self.rng)
        return s

    async def forward(self, ex: ServerExchange, d: RouteDecision, body: RequestBody, rec: Record,
                      protocol: str, client: str = "") -> None:
        """Forward one request; `client` is the original client's address (`ClientInfo.forwarded_for`:
        upstream connections are kept per client address, see `ConnectionPool`).

        The route's timeout (for gRPC: `grpc-timeout` capped by it) runs from the end of the request, as
        Envoy's does, to the end of the response.  When it fires while an attempt awaits its answer, that
        endpoint's outlier detection counts a 504, as Envoy's does."""
        assert d.cluster is not None and d.request is not None
        state = self.state(d.cluster)
        if not await state.limiter.acquire():
            rec.flag("UO")
            await send_local(ex, LocalReply(503, b"upstream connect error or disconnect/reset before headers. "
                                                 b"reset reason: overflow", "UO"), rec)
            return
        timeout = grpc.request_timeout(d.timeout, d.request)
        in_flight = _InFlight()
        try:
            with trio.CancelScope() if timeout else _NO_DEADLINE as deadline:  # (none: nothing cancels it)
                if timeout:
                    body.when_complete(lambda: setattr(deadline, "deadline", trio.current_time() + timeout))
                # a body already read to its end (none, or read ahead) needs no reader task
                async with _NO_NURSERY if body.complete else trio.open_nursery() as reading:
                    if reading is not None:
                        reading.start_soon(body.pump)
                    await self._attempts(ex, d, body, rec, state, protocol, client, in_flight)
                    if reading is not None:
                        reading.cancel_scope.cancel()
            if deadline.cancelled_caught:
                rec.flag("UT")
                if in_flight.endpoint is not None and state.outlier is not None:
                    state.outlier.record(in_flight.endpoint.key, 504, self.clock(), len(d.cluster.endpoints))
                if ex.response_started:
                    await ex.reset()
                else:
                    await send_local(ex, LocalReply(504, b"upstream request timeout", "UT"), rec)
        finally:
            state.limiter.release()

    async def _attempts(self, ex: ServerExchange, d: RouteDecision, body: RequestBody, rec: Record,
                        state: ClusterState, protocol: str, client: str, in_flight: _InFlight) -> None:
        assert d.cluster is not None and d.request is not None
        cluster = d.cluster
        retries_left = d.retries.attempts
        tried: set[str] = set()
        while True:
            rec.attempts += 1
            outlier = state.outlier
            ep = state.balancer.pick(cluster.policy.lb, cluster.endpoints, _available(outlier, self.clock()),
                                     frozenset(tried))
            if ep is None:
                await send_local(ex, LocalReply(503, b"no healthy upstream", "UH"), rec)
                return
            tried.add(ep.key)
            rec.upstream = ep
            # to HTTP/2, the attempt's request body goes out beside its response (gRPC streams both ways at
            # once); to HTTP/1.1 it goes out before the response is read, and no task is needed
            result: _Response | Outcome | None = None
            async with trio.open_nursery() if protocol == "HTTP/2" else _NO_NURSERY as sending:
                try:
                    state.balancer.started(ep)
                    in_flight.endpoint = ep
                    try:
                        result = await self._attempt(ep, d, body, protocol, client, sending)
                        in_flight.endpoint = None  # (left set when the route's timeout cuts the wait short)
                    finally:
                        state.balancer.finished(ep)
                    judged = self._outcome(d, result)
                    if outlier is not None and not judged.deferred:
                        outlier.record(ep.key, judged.outcome.outlier_status, self.clock(), len(cluster.endpoints))
                    if retries_left > 0 and body.resendable and retriable(judged.outcome, d.retries.retry_on) \
                            and state.limiter.try_retry():
                        retries_left -= 1
                    elif isinstance(result, _Response):
                        await self._relay(ex, d, result, rec, ep, client, state if judged.deferred else None)
                        return
                    else:
                        await self._fail(ex, judged.outcome, rec)
                        return
                finally:
                    if sending is not None:
                        sending.cancel_scope.cancel()  # the body of an attempt that is over goes nowhere
            try:  # a retry, once this attempt's sending has stopped
                if isinstance(result, _Response):
                    await result.conn.aclose()
                await trio.sleep(backoff(rec.attempts, self.rng))
            finally:
                state.limiter.retry_done()

    def _outcome(self, d: RouteDecision, result: _Response | Outcome) -> _Judged:
        if not isinstance(result, _Response):
            return _Judged(result)
        status = grpc.status_of(result.head.headers) if d.request is not None and grpc.is_grpc(d.request) else None
        complete = isinstance(result.conn, Http2Stream) and result.conn.response_complete
        # a gRPC answer whose status comes in the trailers is judged when they come
        deferred = d.request is not None and grpc.is_grpc(d.request) and status is None and not complete
        return _Judged(Outcome(status=result.head.status, grpc_status=status), deferred)

    async def _attempt(self, ep: Endpoint, d: RouteDecision, body: RequestBody, protocol: str, client: str,
                       sending: trio.Nursery | None) -> _Response | Outcome:
        """One try: connect (or reuse), send, wait for the response head within the per-try timeout.
        A reused keep-alive connection that turns out dead, and a stream the endpoint's GOAWAY left
        unprocessed, are sent again without counting a try (when the body can be sent again)."""
        assert d.cluster is not None and d.request is not None
        limits = d.cluster.policy.limits
        service = d.service.hostname if d.service else ""
        for _ in range(3):
            conn: UpstreamConnection | None = None
            reused = False
            try:
                per_try = d.retries.per_try_timeout
                with trio.move_on_after(per_try) if per_try else _NO_DEADLINE:  # (past it only when it fired)
                    conn, reused = await self.pool.acquire(ep, protocol, limits.connect_timeout, service, client,
                                                           d.request.header("traceparent") or "")
                    if isinstance(conn, Http2Stream):
                        assert sending is not None  # (an HTTP/2 attempt always has one)
                        await conn.send_head(d.request)
                        sending.start_soon(self._send_body, conn, body)
                    else:
                        await conn.send_request(d.request, body.chunks())
                    head = await conn.receive_response()
                    return _Response(head, conn, protocol)
                if conn is not None:
                    await conn.aclose()
                return Outcome(failure="timeout")
            except UpstreamError as exc:
                if conn is not None:
                    await conn.aclose()
                # a pooled connection found dead (not one stream reset on a live connection)
                stale = reused and isinstance(exc, UpstreamReset) and \
                    (not isinstance(conn, Http2Stream) or conn.connection.closed)
                again = isinstance(exc, NotProcessed) or stale
                if again and body.resendable:
                    continue
                return outcome_of(exc)
            except BaseException:  # the route's timeout, or the client gone: the stream's slot goes back
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
                raise
        return Outcome(failure="reset")

    @staticmethod
    async def _send_body(conn: Http2Stream, body: RequestBody) -> None:
        """The request body and its trailers to the endpoint as the client sends them.  A failure here
        shows on the response side (the endpoint's reset) or is the client's (its handler is cancelled)."""
        try:
            async for chunk in body.chunks():
                await conn.send_data(chunk)
            await conn.end_request(forwardable(body.trailers))
        except (UpstreamError, HttpError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _fail(self, ex: ServerExchange, outcome: Outcome, rec: Record) -> None:
        if outcome.failure == "timeout":
            rec.flag("UT")
            await send_local(ex, LocalReply(504, b"upstream request timeout", "UT"), rec)
            return
        flag = {"connect-failure": "UF", "reset": "UC", "refused-stream": "UR"}.get(outcome.failure, "UF")
        if outcome.failure == "":
            flag = "-"
        reason = {"UF": "connection failure", "UC": "connection termination", "UR": "remote reset"}.get(flag, "")
        await send_local(ex, LocalReply(503, f"upstream connect error or disconnect/reset before headers. "
                                             f"reset reason: {reason}".encode(), flag), rec)

    async def _relay(self, ex: ServerExchange, d: RouteDecision, r: _Response, rec: Record, ep: Endpoint,
                     client: str, deferred: ClusterState | None = None) -> None:
        """The response to the client as it comes, chunk by chunk, and its trailers (HTTP/2).  With
        `deferred`, the gRPC status in the trailers is what outlier detection counts."""
        headers = r.head.headers
        for ops in d.response_ops:
            headers = apply_ops(headers, ops)
        rec.status = r.head.status
        reuse = False
        h2 = r.conn if isinstance(r.conn, Http2Stream) else None
        try:
            if h2 is not None and h2.response_complete and not h2.response_trailers:
                await ex.send_head(ResponseHead(r.head.status, headers), end=True)  # trailers-only (gRPC)
            else:
                await ex.send_head(ResponseHead(r.head.status, headers))
                async for chunk in r.conn.response_body():
                    rec.bytes_sent += len(chunk)
                    await ex.send_data(chunk)
                trailers = h2.response_trailers if h2 is not None else ()
                if trailers and isinstance(ex, TrailerExchange):
                    await ex.send_trailers(trailers)
                else:
                    await ex.end()
                if deferred is not None and deferred.outlier is not None and d.cluster is not None:
                    status = grpc.status_of(trailers)
                    code = grpc.grpc_to_http(status) if status is not None else r.head.status
                    deferred.outlier.record(ep.key, code, self.clock(), len(d.cluster.endpoints))
            reuse = True
        except UpstreamReset as exc:
            rec.flag(exc.flag)
            rec.details = str(exc)
            await ex.reset()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            rec.flag("DC")
        finally:
            if reuse:
                await self.pool.release(ep, r.protocol, r.conn, client=client,
                                        service=d.service.hostname if d.service else "")
            else:
                await r.conn.aclose()


class _NoNursery:
    """`async with` giving no nursery: where a request needs no task beside it (the common path), the
    nursery's cost is saved."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_NURSERY = _NoNursery()


class _NoDeadline:
    """`with` in place of a cancel scope when there is no timeout to set: never cancelled."""

    cancelled_caught = False

    def __enter__(self) -> _NoDeadline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_DEADLINE = _NoDeadline()


@dataclass(frozen=True)
class _Judged:
    outcome: Outcome
    deferred: bool = False  # judged for outlier detection once the trailers come


def _available(outlier: OutlierDetector | None, now: float) -> Callable[[Endpoint], bool]:
    if outlier is None:
        return lambda e: True
    return lambda e: not outlier.is_ejected(e.key, now)


async def send_local(ex: ServerExchange, reply: LocalReply, rec: Record) -> None:
    """Answer from the waypoint itself (errors, faults, denials, direct responses); to a gRPC request as
    a trailers-only answer with the matching grpc-status (`waypoint.l7.grpc`), as Envoy does."""
    if reply.flag != "-":
        rec.flag(reply.flag)
    if grpc.is_grpc(ex.head):
        rec.status = 200
        headers = (*grpc.local_reply_headers(reply.status, reply.body.decode("utf-8", "replace"), reply.grpc_status),
                   *reply.headers)
        try:
            await ex.send_head(ResponseHead(200, headers), end=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            rec.flag("DC")
        return
    rec.status = reply.status
    headers = (("content-length", str(len(reply.body))), ("content-type", "text/plain"), *reply.headers)
    try:
        await ex.send_head(ResponseHead(reply.status, headers))
        if reply.body:
            await ex.send_data(reply.body)
        await ex.end()
        rec.bytes_sent += len(reply.body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        rec.flag("DC")
