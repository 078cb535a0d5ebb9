"""Starting and finishing spans: what a proxy calls on its data path.

    started = tracer.start(propagation.extract(get_header), policy)   # ids, the sampling decision
    ... forward with started.headers() (or started.traceparent on an HBONE CONNECT) ...
    tracer.finish(started, name, SpanKind.SERVER, attributes, error=...)   # to the exporter, if recorded

Every request or tunnel gets a span context, sampled or not, so that ids propagate and the next hop
continues the same trace (as Envoy does); only a sampled span of a process with an exporter, under a
policy that reports spans, is recorded.  Nothing here blocks: `finish` hands a frozen `Span` to the
exporter's queue.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.tracing import propagation
from mesh.tracing.context import NO_PARENT, Parent, SpanContext, new_span_id, new_trace_id
from mesh.tracing.sampler import DEFAULT_SAMPLING_PERCENT, TracingPolicy, decide
from mesh.tracing.span import Attributes, Span, SpanKind, StatusCode

DEFAULT_POLICY = TracingPolicy()


class SpanSink(Protocol):
    def submit(self, span: Span) -> None: ...


@dataclass(frozen=True)
class Started:
    """A span in progress: its context (what its children see), its parent and start, and whether it is
    recorded when it ends."""

    context: SpanContext
    parent_span_id: int
    start_ns: int
    recording: bool
    b3_single: bool = False

    @property
    def traceparent(self) -> str:
        return propagation.format_traceparent(self.context)

    def headers(self) -> list[tuple[str, str]]:
        """The propagation headers of a request made on this span's behalf."""
        return propagation.headers(self.context, self.parent_span_id, b3_single=self.b3_single)


class Tracer:
    """Spans of one process.  Without an exporter nothing is recorded, but contexts still propagate."""

    def __init__(self, exporter: SpanSink | None = None, *, sampling: float = DEFAULT_SAMPLING_PERCENT,
                 rng: random.Random | None = None, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.exporter = exporter
        self.sampling = sampling  # percent, when no Telemetry sets it
        self._rng = rng
        self._clock_ns = clock_ns

    @property
    def exporting(self) -> bool:
        return self.exporter is not None

    def start(self, parent: Parent = NO_PARENT, policy: TracingPolicy = DEFAULT_POLICY) -> Started:
        """A child of `parent`'s context (a new trace without one), sampled as the parent decided, else
        by `policy` (else this tracer's default percentage)."""
        sampled = decide(parent, policy, self.sampling, self._rng)
        caller = parent.context
        trace_id = caller.trace_id if caller is not None else new_trace_id(self._rng)
        ctx = SpanContext(trace_id, new_span_id(self._rng), sampled, caller.trace_state if caller else "")
        return Started(ctx, caller.span_id if caller is not None else 0, self._clock_ns(),
                       recording=sampled and policy.reporting and self.exporter is not None,
                       b3_single=parent.b3_single)

    def finish(self, started: Started, name: str, kind: SpanKind, attributes: Attributes = (), *,
               error: bool = False, message: str = "") -> None:
        """End the span; hand it to the exporter if it is recorded."""
        if not started.recording or self.exporter is None:
            return
        ctx = started.context
        self.exporter.submit(Span(
            trace_id=ctx.trace_id, span_id=ctx.span_id, parent_span_id=started.parent_span_id, name=name,
            kind=kind, start_ns=started.start_ns, end_ns=max(started.start_ns, self._clock_ns()),
            attributes=attributes, status=StatusCode.ERROR if error else StatusCode.UNSET,
            status_message=message if error else "", trace_state=ctx.trace_state, sampled=True))
