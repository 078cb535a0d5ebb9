"""The span exporter: a bounded queue, batches sent over OTLP/HTTP by a background task.

    exporter = SpanExporter(OtlpEndpoint.parse(url), resource, registry)
    await nursery.start(exporter.run)          # the background task, until cancelled
    exporter.submit(span)                      # from the data path: O(1), never blocks, never raises

The data path only appends to a deque.  When the queue holds `max_queue` spans, a new span is dropped
and counted (`mesh_trace_spans_dropped_total{reason="queue_full"}`): a slow or absent collector costs
spans, never latency.  The background task wakes every `interval` seconds, or as soon as a full batch
is waiting, and sends the queue in batches of at most `max_batch` spans; encoding and the HTTP POST run
in a worker thread, so the event loop never waits on them.  A batch the collector does not take (no
connection, no answer within `timeout`, a status other than 2xx) is dropped and counted
(`reason="export_failed"`), and sending pauses with exponential backoff (up to 30 s), so an absent
collector is not hammered.  The failure is logged as a warning at most once a minute, with the counts.

Where and how spans are sent (http or https, the CA, extra headers): `mesh.tracing.collector`.  A
process that stops calls `flush` (bounded by its caller) so that the last spans are not lost.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence

import trio
from prometheus_client import CollectorRegistry, Counter

from mesh.tracing.collector import ENDPOINT_ENV, OTLP_HTTP_PORT, Collector, OtlpEndpoint
from mesh.tracing.errors import ExportError
from mesh.tracing.otlp import encode
from mesh.tracing.span import Resource, Span

__all__ = ["ENDPOINT_ENV", "OTLP_HTTP_PORT", "INTERVAL_ENV", "Collector", "OtlpEndpoint", "SpanExporter"]

log = logging.getLogger("mesh.tracing")

INTERVAL_ENV = "OTEL_BSP_SCHEDULE_DELAY"  # OpenTelemetry's delay between two exports, in milliseconds
MAX_QUEUE = 4096
MAX_BATCH = 512
INTERVAL = 1.0  # seconds between exports when no batch is full
TIMEOUT = 5.0  # seconds for one POST
MAX_BACKOFF = 30.0
WARN_EVERY = 60.0  # seconds between warnings about a collector that does not take spans


Post = Callable[[bytes, float], None]  # one export's body and timeout; raises ExportError


class ExporterMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.dropped = Counter("mesh_trace_spans_dropped", "Spans not delivered to the trace collector.",
                               ["reason"], registry=r)
        self.exported = Counter("mesh_trace_spans_exported", "Spans the trace collector accepted.", registry=r)
        for reason in ("queue_full", "export_failed"):
            self.dropped.labels(reason)


class SpanExporter:
    def __init__(self, target: OtlpEndpoint | Collector, resource: Resource, registry: CollectorRegistry | None = None,
                 *, max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH, interval: float = INTERVAL,
                 timeout: float = TIMEOUT, post: Post | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.collector = target if isinstance(target, Collector) else Collector(target)
        self.endpoint = self.collector.endpoint
        self.resource = resource
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch, max_queue))
        self.interval = interval
        self.timeout = timeout
        self.metrics = ExporterMetrics(registry)
        self._post = post or self.collector.post
        self._clock = clock
        self._queue: collections.deque[Span] = collections.deque()
        self._wake: trio.Event | None = None
        self._failures = 0
        self._retry_at = 0.0  # trio time before which nothing is sent (backoff)
        self._warned_at: float | None = None
        self._unreported = 0  # spans dropped since the last warning
        self.sent_batches = 0

    # ---- the data path ----------------------------------------------------------------------------------

    def submit(self, span: Span) -> None:
        """Queue a finished span; drop it (counted) when the queue is full.  Never blocks."""
        if len(self._queue) >= self.max_queue:
            self.metrics.dropped.labels("queue_full").inc()
            self._unreported += 1
            return
        self._queue.append(span)
        if len(self._queue) == self.max_batch and self._wake is not None:
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- the background task ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send what is queued, batch by batch, until cancelled."""
        self._wake = trio.Event()
        log.info('{"event": "exporting spans", "endpoint": "%s"}', self.endpoint)
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            if trio.current_time() >= self._retry_at:
                await self._drain()

    async def flush(self) -> None:
        """Send everything queued now (a process that stops, tests), backoff or not."""
        self._retry_at = 0.0
        await self._drain()

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            try:
                await trio.to_thread.run_sync(self._send, batch, abandon_on_cancel=True)
            except ExportError as exc:
                self._failed(len(batch), str(exc))
                return
            self._failures = 0
            self.sent_batches += 1
            self.metrics.exported.inc(len(batch))

    def _send(self, batch: Sequence[Span]) -> None:
        """In a worker thread: encode and POST."""
        self._post(encode(self.resource, batch), self.timeout)

    def _failed(self, n: int, why: str) -> None:
        self.metrics.dropped.labels("export_failed").inc(n)
        self._unreported += n
        self._failures += 1
        backoff = min(MAX_BACKOFF, self.interval * 2 ** min(self._failures, 10))
        self._retry_at = trio.current_time() + backoff
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("spans not delivered (%d dropped since the last warning; %d queued): %s; is the trace "
                        "collector running and reachable? Retrying in %.0fs", self._unreported, len(self._queue),
                        why, backoff)
            self._unreported = 0

