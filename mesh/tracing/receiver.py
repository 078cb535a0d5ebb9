"""An OTLP/HTTP trace receiver: what a collector does with the exporter's POSTs, small enough to embed.

    store = TraceStore()
    with OtlpReceiver(store.add, "172.30.0.1", 4318, netns="amb.demo.underlay") as receiver:
        ... store.traces(), store.trace(trace_id) ...

`otlp_router(on_spans)` is the pure part (`mesh.serve.routes`): `POST /v1/traces` with an
`application/x-protobuf` ExportTraceServiceRequest, answered with an empty ExportTraceServiceResponse;
415 for another content type (OTLP/JSON is not read), 400 for a body that does not decode.  `OtlpReceiver`
serves it in a thread of its own (`mesh.serve.thread`), optionally over https (`tls`: a server context),
optionally listening inside a network namespace (the local cluster's underlay, which every node and pod
reaches).  `TraceStore` keeps what arrived,
grouped by trace, bounded (the oldest traces go first); a dashboard's `/api/traces` reads it.
"""

from __future__ import annotations

import collections
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mesh.proto import otlp_pb2 as otlp
from mesh.serve.routes import Request, Response, Router
from mesh.serve.thread import ServerThread
from mesh.tracing.collector import OTLP_HTTP_PORT
from mesh.tracing.errors import OtlpError
from mesh.tracing.otlp import CONTENT_TYPE, TRACES_PATH, ReceivedSpan, decode, received

MAX_BODY = 16 * 1024 * 1024  # an export of a few thousand spans
MAX_TRACES = 2000

OnSpans = Callable[[list[ReceivedSpan]], None]


def otlp_router(on_spans: OnSpans) -> Router:
    """`POST /v1/traces` -> `on_spans(spans)`, answered as OTLP/HTTP answers."""

    def export(request: Request) -> Response:
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != CONTENT_TYPE:
            return Response.text(f"send OTLP/HTTP protobuf (content-type {CONTENT_TYPE}), not {content_type or 'none'}",
                                 415)
        try:
            spans = received(decode(request.body))
        except OtlpError as exc:
            return Response.text(str(exc), 400)
        on_spans(spans)
        return Response(200, otlp.ExportTraceServiceResponse().SerializeToString(), CONTENT_TYPE)

    return Router().add(TRACES_PATH, export, methods=("POST",))


@dataclass(frozen=True)
class TraceSummary:
    trace_id: str
    spans: int
    services: tuple[str, ...]  # the reporters' service.name values, in order of first appearance
    root: str  # the name of the span without a parent among those received ("" if none arrived)
    start_ns: int
    duration_ms: float


class TraceStore:
    """Received spans by trace id, at most `max_traces` traces (oldest dropped first).  Thread-safe."""

    def __init__(self, max_traces: int = MAX_TRACES) -> None:
        self.max_traces = max_traces
        self._traces: collections.OrderedDict[str, list[ReceivedSpan]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.received = 0

    def add(self, spans: Iterable[ReceivedSpan]) -> None:
        with self._lock:
            for span in spans:
                self.received += 1
                self._traces.setdefault(span.trace_id, []).append(span)
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace, by start time."""
        with self._lock:
            return sorted(self._traces.get(trace_id.lower(), ()), key=lambda s: (s.start_ns, s.span_id))

    def traces(self) -> list[TraceSummary]:
        """Every trace held, newest first."""
        with self._lock:
            items = [(tid, list(spans)) for tid, spans in self._traces.items()]
        out = []
        for tid, spans in reversed(items):
            ids = {s.span_id for s in spans}
            roots = [s for s in spans if not s.parent_span_id or s.parent_span_id not in ids]
            start = min(s.start_ns for s in spans)
            out.append(TraceSummary(tid, len(spans), tuple(dict.fromkeys(s.service for s in spans)),
                                    min(roots, key=lambda s: s.start_ns).name if roots else "", start,
                                    (max(s.end_ns for s in spans) - start) / 1e6))
        return out


class OtlpReceiver:
    """`otlp_router` served in a thread: `start()` returns the bound port; `stop()` ends it."""

    def __init__(self, on_spans: OnSpans, host: str = "127.0.0.1", port: int = OTLP_HTTP_PORT, *,
                 netns: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.scheme = "https" if tls is not None else "http"
        self._thread = ServerThread("otlp-receiver").tcp(otlp_router(on_spans), host, port, name="OTLP receiver",
                                                         max_body=MAX_BODY, tls=tls, netns=netns)
        self.port = port

    def start(self) -> int:
        (self.port,) = (int(a) for a in self._thread.start())
        return self.port

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{TRACES_PATH}"

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
