"""Forwarding one routed request: request body buffering, attempts with retries and timeouts, the
endpoint choice (load balancer, outlier detection, pool limits) and relaying the response.

`Forwarder.forward` is the I/O half of a `RouteDecision`; it reports what happened into a `Record` that
the proxy turns into metrics and an access-log line.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from waypoint.errors import HttpError, UpstreamError, UpstreamReset
from waypoint.http.exchange import ServerExchange, UpstreamConnection, iterate
from waypoint.l7.lb import Balancer
from waypoint.l7.limits import ClusterLimiter
from waypoint.l7.model import Endpoint, ResponseHead
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
    """The request body, buffered up to `bound` bytes so it can be sent again on retry; a larger body is
    streamed once (and the request is not retried)."""

    def __init__(self, source: AsyncIterator[bytes], bound: int, record: Record) -> None:
        self._source = source
        self._bound = bound
        self._record = record
        self.buffered = b""
        self.complete = False
        self._used = False

    async def prepare(self) -> None:
        parts: list[bytes] = []
        size = 0
        async for chunk in self._source:
            parts.append(chunk)
            size += len(chunk)
            self._record.bytes_received += len(chunk)
            if size > self._bound:
                self.buffered = b"".join(parts)
                return
        self.buffered = b"".join(parts)
        self.complete = True

    @property
    def replayable(self) -> bool:
        return self.complete

    def chunks(self) -> AsyncIterator[bytes]:
        if self.complete:
            return iterate(self.buffered)
        if self._used:
            raise HttpError(500, "request body already sent")
        self._used = True
        return self._rest()

    async def _rest(self) -> AsyncIterator[bytes]:
        yield self.buffered
        async for chunk in self._source:
            self._record.bytes_received += len(chunk)
            yield chunk


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
        """Forward one request; `client` is the original client's `ip:port` (upstream connections are
        kept per client, see `ConnectionPool`)."""
        assert d.cluster is not None
        state = self.state(d.cluster)
        if not await state.limiter.acquire():
            rec.flag("UO")
            await send_local(ex, LocalReply(503, b"upstream connect error or disconnect/reset before headers. "
                                                 b"reset reason: overflow", "UO"), rec)
            return
        try:
            with trio.move_on_after(d.timeout if d.timeout else math.inf) as deadline:
                await self._attempts(ex, d, body, rec, state, protocol, client)
            if deadline.cancelled_caught:
                rec.flag("UT")
                if ex.response_started:
                    await ex.reset()
                else:
                    await send_local(ex, LocalReply(504, b"upstream request timeout", "UT"), rec)
        finally:
            state.limiter.release()

    async def _attempts(self, ex: ServerExchange, d: RouteDecision, body: RequestBody, rec: Record,
                        state: ClusterState, protocol: str, client: str) -> None:
        assert d.cluster is not None and d.request is not None
        cluster = d.cluster
        retries_left = d.retries.attempts if body.replayable else 0
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
            state.balancer.started(ep)
            try:
                result = await self._attempt(ep, d, body, protocol, client)
            finally:
                state.balancer.finished(ep)
            outcome = Outcome(status=result.head.status) if isinstance(result, _Response) else result
            if outlier is not None:
                outlier.record(ep.key, outcome.outlier_status, self.clock(), len(cluster.endpoints))
            if retries_left > 0 and retriable(outcome, d.retries.retry_on) and state.limiter.try_retry():
                retries_left -= 1
                try:
                    if isinstance(result, _Response):
                        await result.conn.aclose()
                    await trio.sleep(backoff(rec.attempts, self.rng))
                finally:
                    state.limiter.retry_done()
                continue
            if isinstance(result, _Response):
                await self._relay(ex, d, result, rec, ep, client)
                return
            await self._fail(ex, outcome, rec)
            return

    async def _attempt(self, ep: Endpoint, d: RouteDecision, body: RequestBody,
                       protocol: str, client: str) -> _Response | Outcome:
        """One try: connect (or reuse), send, wait for the response head within the per-try timeout.
        A reused keep-alive connection that turns out dead is replaced once without counting a try."""
        assert d.cluster is not None and d.request is not None
        limits = d.cluster.policy.limits
        service = d.service.hostname if d.service else ""
        for _ in range(2):
            conn: UpstreamConnection | None = None
            reused = False
            try:
                with trio.move_on_after(d.retries.per_try_timeout or math.inf):
                    conn, reused = await self.pool.acquire(ep, protocol, limits.connect_timeout, service, client,
                                                           d.request.header("traceparent") or "")
                    await conn.send_request(d.request, body.chunks())
                    head = await conn.receive_response()
                    return _Response(head, conn, protocol)
                if conn is not None:
                    await conn.aclose()
                return Outcome(failure="timeout")
            except UpstreamError as exc:
                if conn is not None:
                    await conn.aclose()
                if reused and isinstance(exc, UpstreamReset):
                    continue
                return outcome_of(exc)
        return Outcome(failure="reset")

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
                     client: str) -> None:
        headers = r.head.headers
        for ops in d.response_ops:
            headers = apply_ops(headers, ops)
        rec.status = r.head.status
        reuse = False
        try:
            await ex.send_head(ResponseHead(r.head.status, headers))
            async for chunk in r.conn.response_body():
                rec.bytes_sent += len(chunk)
                await ex.send_data(chunk)
            await ex.end()
            reuse = True
        except UpstreamReset as exc:
            rec.flag(exc.flag)
            rec.details = str(exc)
            await ex.reset()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            rec.flag("DC")
        finally:
            if reuse:
                await self.pool.release(ep, r.protocol, r.conn, client=client)
            else:
                await r.conn.aclose()


def _available(outlier: OutlierDetector | None, now: float) -> Callable[[Endpoint], bool]:
    if outlier is None:
        return lambda e: True
    return lambda e: not outlier.is_ejected(e.key, now)


async def send_local(ex: ServerExchange, reply: LocalReply, rec: Record) -> None:
    """Answer from the waypoint itself (errors, faults, denials, direct responses)."""
    rec.status = reply.status
    if reply.flag != "-":
        rec.flag(reply.flag)
    headers = (("content-length", str(len(reply.body))), ("content-type", "text/plain"), *reply.headers)
    try:
        await ex.send_head(ResponseHead(reply.status, headers))
        if reply.body:
            await ex.send_data(reply.body)
        await ex.end()
        rec.bytes_sent += len(reply.body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        rec.flag("DC")
