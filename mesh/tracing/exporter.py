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

Endpoint: the OTLP/HTTP traces URL, `http://HOST:PORT/v1/traces` (a URL without a path gets
`/v1/traces`; the port defaults to 4318).  Plain http only: the collector is expected in-cluster (or a
local agent), as Istio's OpenTelemetry provider talks to it.
"""

from __future__ import annotations

import collections
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, Counter

from mesh.serve import client
from mesh.serve.errors import ServeError
from mesh.tracing.errors import ExportError, TracingError
from mesh.tracing.otlp import CONTENT_TYPE, TRACES_PATH, encode
from mesh.tracing.span import Resource, Span

log = logging.getLogger("mesh.tracing")

OTLP_HTTP_PORT = 4318
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
MAX_QUEUE = 4096
MAX_BATCH = 512
INTERVAL = 1.0  # seconds between exports when no batch is full
TIMEOUT = 5.0  # seconds for one POST
MAX_BACKOFF = 30.0
WARN_EVERY = 60.0  # seconds between warnings about a collector that does not take spans


@dataclass(frozen=True)
class OtlpEndpoint:
    host: str
    port: int = OTLP_HTTP_PORT
    path: str = TRACES_PATH

    @classmethod
    def parse(cls, url: str) -> OtlpEndpoint:
        """`http://host[:port][/path]`; `TracingError` saying what is wrong otherwise."""
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme == "https":
            raise TracingError(f"OTLP endpoint {url!r}: https is not supported; give the collector's plain http "
                               "OTLP/HTTP receiver (port 4318), e.g. http://otel-collector.observability:4318")
        if parts.scheme != "http" or not parts.hostname:
            raise TracingError(f"OTLP endpoint {url!r} is not an http URL such as http://collector:4318/v1/traces")
        try:
            port = parts.port or OTLP_HTTP_PORT
        except ValueError:
            raise TracingError(f"OTLP endpoint {url!r} has an invalid port") from None
        path = parts.path if parts.path not in ("", "/") else TRACES_PATH
        return cls(parts.hostname, port, path + (f"?{parts.query}" if parts.query else ""))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def client_endpoint(self) -> client.Endpoint:
        return client.Endpoint.tcp(self.host, self.port)


Post = Callable[[OtlpEndpoint, bytes, float], None]  # raises ExportError


def post_otlp(endpoint: OtlpEndpoint, body: bytes, timeout: float) -> None:
    """POST one export (blocking: the exporter calls it in a worker thread)."""
    try:
        reply = client.request(endpoint.client_endpoint(), "POST", endpoint.path, body,
                               headers={"content-type": CONTENT_TYPE}, timeout=timeout)
    except ServeError as exc:
        raise ExportError(f"OTLP collector {endpoint}: {exc}") from None
    if not 200 <= reply.status < 300:
        raise ExportError(f"OTLP collector {endpoint} answered {reply.status}: {reply.text.strip()[:200]}")


class ExporterMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.dropped = Counter("mesh_trace_spans_dropped", "Spans not delivered to the trace collector.",
                               ["reason"], registry=r)
        self.exported = Counter("mesh_trace_spans_exported", "Spans the trace collector accepted.", registry=r)
        for reason in ("queue_full", "export_failed"):
            self.dropped.labels(reason)


class SpanExporter:
    def __init__(self, endpoint: OtlpEndpoint, resource: Resource, registry: CollectorRegistry | None = None, *,
                 max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH, interval: float = INTERVAL,
                 timeout: float = TIMEOUT, post: Post = post_otlp,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self.resource = resource
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch, max_queue))
        self.interval = interval
        self.timeout = timeout
        self.metrics = ExporterMetrics(registry)
        self._post = post
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
        self._post(self.endpoint, encode(self.resource, batch), self.timeout)

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

