"""One connection's outcome, recorded once: response flag, bytes each way, error, metrics, access log.

STYLE.md 13, as ztunnel's `ConnectionResult`.  A proxy opens a `ConnectionOutcome` once it has decided
(`OutcomeRecorder.outbound` / `.inbound`; the TCP `opened` counter counts the connection then) and
carries the connection out inside `with outcome:`.  How it ended is told in one of three ways:

- `relayed(copied)`: the relay's result.  The bytes were counted as they went (`outcome.bytes` is the
  relay's counter); a side that broke is flagged DC (the client's) or UC (the destination's).
- `refused(refusal)`: a `Refusal` the inbound decision made before any I/O.
- a `ProxyError` leaving the block: it carries its own flag, status and failure reason.

Leaving the block records it, once: the closed counter labelled with the flag, the agent's failure
counter, one access-log line, and the tunnel's span (`nodeagent.tracing`) when the agent traces.  A `ProxyError` ends there (the proxy has answered its client already);
any other exception (a cancellation, a client gone mid-answer) is recorded and goes on.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio

from mesh.bounded import BoundedMemo
from mesh.hbone.relay import RelayResult
from mesh.identity import SpiffeId
from mesh.policy.evaluator import Decision
from mesh.proto import discovery_pb2 as pb
from nodeagent.accesslog import (
    INBOUND,
    OUTBOUND,
    RESULT_OK,
    AccessLog,
    AccessLogEntry,
    Peer,
    decision_fields,
    result_of,
)
from nodeagent.metrics import FailureReason, NodeAgentMetrics, Reporter, ResponseFlag, TcpLabels, tcp_labels
from nodeagent.pods.source import PodRef
from nodeagent.proxy.admission import Admit, InboundConnection, Refusal
from nodeagent.proxy.context import PodContext
from nodeagent.proxy.errors import ProxyError
from nodeagent.proxy.routing import Route
from nodeagent.tracing import TunnelSpan, TunnelTracer


class ConnectionOutcome:
    """How one connection went, built while it runs; `record()` (leaving the `with` block) reports it."""

    def __init__(self, metrics: NodeAgentMetrics, log: AccessLog, direction: str, labels: TcpLabels,
                 source: Peer, destination: Peer, *, service: str = "", decision: Decision | None = None,
                 span: TunnelSpan | None = None, on_trio: Callable[[Callable[[], None]], None] | None = None) -> None:
        self._metrics = metrics
        self.span = span  # the tunnel's span (HBONE only)
        self._on_trio = on_trio  # on the engine: how to run the span's end where the exporter lives
        self._log = log
        self.direction = direction
        self.source = source
        self.destination = destination
        self.service = service
        self.security = labels.connection_security_policy
        self.decision = decision
        self.bytes = metrics.tcp.open(labels)
        self.flag = ResponseFlag.NONE
        self.result = RESULT_OK
        self.failure: FailureReason | None = None
        self.error = ""
        self.recorded = False
        self.start = time.time()
        self._t0 = time.monotonic()

    @property
    def traceparent(self) -> str | None:
        """The trace context for the tunnel's CONNECT (None when the connection has no span)."""
        return self.span.traceparent if self.span is not None else None

    def relayed(self, copied: RelayResult) -> None:
        if copied.error:
            self.error = copied.error
            self.flag = ResponseFlag.DOWNSTREAM_TERMINATED if copied.failed == "a" else ResponseFlag.UPSTREAM_TERMINATED

    def refused(self, refusal: Refusal) -> None:
        self._ended(refusal.flag, result_of(refusal.status, refusal.reason), refusal.failure, refusal.reason)

    def failed(self, error: ProxyError) -> None:
        self._ended(error.flag, result_of(error.status, str(error)), error.failure, error.detail)

    def _ended(self, flag: ResponseFlag, result: str, failure: FailureReason, error: str) -> None:
        self.flag, self.result, self.failure, self.error = flag, result, failure, error

    def record(self) -> None:
        """Count the close and the failure, write the log line; only the first call does anything."""
        if self.recorded:
            return
        self.recorded = True
        self.bytes.close(self.flag)
        if self.failure is not None:
            self._metrics.agent.connection_failed(self.direction, self.failure)
        fields: dict[str, Any] = decision_fields(self.decision) if self.decision is not None else {}
        fields["result"] = self.result
        self._log.write(AccessLogEntry(
            direction=self.direction, start=self.start, duration=time.monotonic() - self._t0,
            source=self.source, destination=self.destination, destination_service=self.service,
            bytes_sent=self.bytes.sent, bytes_received=self.bytes.received,
            connection_security_policy=self.security, error=self.error, **fields))
        if self.span is not None:
            end = functools.partial(self.span.end, flag=str(self.flag), bytes_sent=self.bytes.sent,
                                    bytes_received=self.bytes.received, error=self.error)
            if self._on_trio is not None:
                self._on_trio(end)
            else:
                end()

    def __enter__(self) -> ConnectionOutcome:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if isinstance(exc, ProxyError):
            self.failed(exc)
        elif isinstance(exc, trio.Cancelled | asyncio.CancelledError) and self.flag is ResponseFlag.NONE:
            # The client reset its CONNECT before the answer (its handler is cancelled), or the pod's
            # proxies stopped: either way the downstream side ended it.
            self.flag = ResponseFlag.DOWNSTREAM_TERMINATED
            self.error = self.error or "cancelled: the client went away before its answer, or the pod left the mesh"
        elif exc is not None and not self.error:
            self.error = str(exc) or type(exc).__name__
        self.record()
        return isinstance(exc, ProxyError)


class _LabelCache:
    """`tcp_labels` per connection's ends, cached: a connection's labels are those of the last one
    between the same workloads.  The workload and service records are the read model's, replaced whole
    when they change, so an entry holds them and is used only for those very objects (a changed record
    is a new entry); at most `size` entries (emptied when full)."""

    def __init__(self, size: int = 4096) -> None:
        self._entries: BoundedMemo[tuple[Any, ...], tuple[Any, Any, Any, TcpLabels]] = BoundedMemo(size)

    def get(self, reporter: Reporter, source: pb.Workload | None, source_principal: SpiffeId | None,
            destination: pb.Workload | None, destination_principal: SpiffeId | None,
            service: pb.Service | None, mutual_tls: bool) -> TcpLabels:
        key = (reporter, id(source), source_principal, id(destination), destination_principal, id(service),
               mutual_tls)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is source and entry[1] is destination and entry[2] is service:
            return entry[3]
        labels = tcp_labels(reporter, source=source, source_principal=source_principal, destination=destination,
                            destination_principal=destination_principal, service=service, mutual_tls=mutual_tls)
        self._entries.keep(key, (source, destination, service, labels))
        return labels


_LABELS = _LabelCache()


def workload_peer(address: tuple[str, int], w: pb.Workload | None, principal: str = "") -> Peer:
    if w is None:
        return Peer(ip=address[0], port=address[1], principal=principal)
    return Peer(ip=address[0], port=address[1], workload=w.name, namespace=w.namespace, principal=principal)


@dataclass(frozen=True)
class OutcomeRecorder:
    """Opens the outcomes of one pod's connections, labelled as the direction's reporter sees them:
    the source's agent on the outbound path, the destination's on the inbound path."""

    metrics: NodeAgentMetrics
    log: AccessLog
    pod: PodRef
    tracer: TunnelTracer | None = None
    on_trio: Callable[[Callable[[], None]], None] | None = None  # the engine's hand-over to trio

    @classmethod
    def of(cls, ctx: PodContext) -> OutcomeRecorder:
        engine = ctx.parts.engine
        return cls(ctx.parts.metrics, ctx.parts.log, ctx.pod, ctx.parts.tracer,
                   engine.to_trio_soon if engine is not None else None)

    def outbound(self, src: tuple[str, int], dst: tuple[str, int], source: pb.Workload | None,
                 route: Route) -> ConnectionOutcome:
        expected = route.expected[0] if route.expected else None
        labels = _LABELS.get(Reporter.SOURCE, source, self.pod.identity, route.workload, expected, route.service,
                             route.tunnelled)
        return ConnectionOutcome(self.metrics, self.log, OUTBOUND, labels,
                                 workload_peer(src, source, str(self.pod.identity)),
                                 workload_peer(dst, route.workload, str(expected or "")),
                                 service=route.service.hostname if route.service else "",
                                 on_trio=self.on_trio,
                                 span=self.tracer.outbound(
                                     route.authority, source=f"{src[0]}:{src[1]}",
                                     source_principal=str(self.pod.identity),
                                     destination_principal=str(expected or ""),
                                     service=route.service.hostname if route.service else "")
                                 if self.tracer is not None and route.tunnelled else None)

    def inbound(self, conn: InboundConnection, verdict: Admit | Refusal, source: pb.Workload | None,
                destination: pb.Workload | None) -> ConnectionOutcome:
        labels = _LABELS.get(Reporter.DESTINATION, source, conn.peer, destination, self.pod.identity, None,
                             conn.peer is not None)
        return ConnectionOutcome(self.metrics, self.log, INBOUND, labels,
                                 workload_peer((conn.source_ip, conn.source_port), source, str(conn.peer or "")),
                                 workload_peer((self.pod.ip, conn.destination.port), destination,
                                               str(self.pod.identity)),
                                 decision=verdict.decision, on_trio=self.on_trio,
                                 span=self.tracer.inbound(
                                     conn.traceparent, str(conn.destination),
                                     source=f"{conn.source_ip}:{conn.source_port}",
                                     source_principal=str(conn.peer or ""),
                                     destination_principal=str(self.pod.identity))
                                 if self.tracer is not None and conn.hbone else None)
