"""OTLP encoding (decoded back with the OTLP messages), the exporter against real OTLP/HTTP receivers, the
queue bound and drop counting, a collector that is away or slow, and the embeddable receiver."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from mesh.proto import otlp_pb2
from mesh.serve import client
from mesh.tracing.errors import TracingError
from mesh.tracing.exporter import OtlpEndpoint, SpanExporter
from mesh.tracing.otlp import decode, encode, received
from mesh.tracing.receiver import OtlpReceiver, TraceStore
from mesh.tracing.span import Resource, Span, SpanKind, StatusCode

RESOURCE = Resource.of({"service.name": "waypoint.bookinfo", "k8s.node.name": "node-1"})


def span(i: int = 1, trace_id: int = 0xA1, parent: int = 0, **extra: object) -> Span:
    fields: dict = {"trace_id": trace_id, "span_id": 0x100 + i, "parent_span_id": parent, "name": f"op-{i}",
                    "kind": SpanKind.SERVER, "start_ns": 1_700_000_000_000_000_000 + i,
                    "end_ns": 1_700_000_000_005_000_000 + i}
    fields.update(extra)
    return Span(**fields)


# ---- encoding ---------------------------------------------------------------------------------------------


def test_encoding_decodes_back_with_the_otlp_messages() -> None:
    spans = [span(1, attributes=(("http.method", "GET"), ("http.status_code", 503), ("error", True),
                                 ("ratio", 0.5)),
                  status=StatusCode.ERROR, status_message="UF", trace_state="rojo=1"),
             span(2, parent=0x101, kind=SpanKind.CLIENT)]
    request = otlp_pb2.ExportTraceServiceRequest()
    request.ParseFromString(encode(RESOURCE, spans))
    (rs,) = request.resource_spans
    assert {kv.key: kv.value.string_value for kv in rs.resource.attributes} == \
        {"service.name": "waypoint.bookinfo", "k8s.node.name": "node-1"}
    (ss,) = rs.scope_spans
    assert ss.scope.name == "ambient-mesh"
    first, second = ss.spans
    assert first.trace_id == (0xA1).to_bytes(16, "big") and first.span_id == (0x101).to_bytes(8, "big")
    assert first.parent_span_id == b"" and second.parent_span_id == (0x101).to_bytes(8, "big")
    assert first.name == "op-1" and first.kind == otlp_pb2.Span.SPAN_KIND_SERVER
    assert second.kind == otlp_pb2.Span.SPAN_KIND_CLIENT
    assert first.start_time_unix_nano == spans[0].start_ns and first.end_time_unix_nano == spans[0].end_ns
    values = {kv.key: kv.value for kv in first.attributes}
    assert values["http.method"].string_value == "GET" and values["http.status_code"].int_value == 503
    assert values["error"].bool_value is True and values["ratio"].double_value == 0.5
    assert first.status.code == otlp_pb2.Status.STATUS_CODE_ERROR and first.status.message == "UF"
    assert first.trace_state == "rojo=1" and first.flags & 0x1
    # And our own decoder agrees.
    (a, b) = received(decode(encode(RESOURCE, spans)))
    assert a.trace_id == f"{0xA1:032x}" and b.parent_span_id == a.span_id and a.service == "waypoint.bookinfo"
    assert a.attributes["http.status_code"] == 503 and a.status_code == 2 and a.duration_ms == 5.0


@pytest.mark.parametrize(("url", "expected"), [
    ("http://collector:4318/v1/traces", OtlpEndpoint("collector", 4318, "/v1/traces")),
    ("http://10.0.0.5", OtlpEndpoint("10.0.0.5", 4318, "/v1/traces")),
    ("http://10.0.0.5:55681/", OtlpEndpoint("10.0.0.5", 55681, "/v1/traces")),
    ("http://c:1/otlp/v1/traces", OtlpEndpoint("c", 1, "/otlp/v1/traces")),
    ("https://otlp.example.com", OtlpEndpoint("otlp.example.com", 4318, "/v1/traces", "https")),
])
def test_endpoint_urls(url: str, expected: OtlpEndpoint) -> None:
    assert OtlpEndpoint.parse(url) == expected


@pytest.mark.parametrize("url", ["collector:4318", "ftp://c/", "https://user:pw@c:4318/v1/traces", "http://c:x/"])
def test_bad_endpoint_urls_say_what_to_give(url: str) -> None:
    with pytest.raises(TracingError, match="OTLP endpoint"):
        OtlpEndpoint.parse(url)


# ---- a receiver written for the test: stdlib HTTP, decoding with the OTLP messages -------------------------


class Collector:
    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.requests: list[otlp_pb2.ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.paths: list[str] = []
        self.delay, self.status = delay, status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(outer.delay)
                req = otlp_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                outer.requests.append(req)
                outer.content_types.append(self.headers["content-type"])
                outer.paths.append(self.path)
                answer = otlp_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(outer.status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    @property
    def spans(self) -> list[otlp_pb2.Span]:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


@contextlib.contextmanager
def running(c: Collector) -> Iterator[Collector]:
    thread = threading.Thread(target=c.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield c
    finally:
        c.server.shutdown()
        c.server.server_close()


def dropped(exporter: SpanExporter, reason: str) -> float:
    return exporter.metrics.dropped.labels(reason)._value.get()


async def until(check: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            await trio.sleep(0.01)


def test_spans_are_exported_in_batches() -> None:
    async def main(c: Collector) -> None:
        exporter = SpanExporter(OtlpEndpoint("127.0.0.1", c.port), RESOURCE, max_batch=10, interval=0.05)
        async with trio.open_nursery() as n:
            await n.start(exporter.run)
            for i in range(25):
                exporter.submit(span(i))
            # The collector has them all, and the exporter has seen the last answer (counted on return).
            await until(lambda: len(c.spans) == 25 and exporter.metrics.exported._value.get() == 25)
            n.cancel_scope.cancel()
        assert [len(list(r.resource_spans[0].scope_spans[0].spans)) for r in c.requests] == [10, 10, 5]
        assert set(c.content_types) == {"application/x-protobuf"} and set(c.paths) == {"/v1/traces"}
        assert sorted(s.name for s in c.spans) == sorted(f"op-{i}" for i in range(25))
        assert exporter.metrics.exported._value.get() == 25 and dropped(exporter, "queue_full") == 0

    with running(Collector()) as c:
        trio.run(main, c)


def test_the_queue_is_bounded_and_drops_are_counted() -> None:
    exporter = SpanExporter(OtlpEndpoint("127.0.0.1", 1), RESOURCE, max_queue=5, max_batch=2)
    for i in range(8):
        exporter.submit(span(i))
    assert exporter.queued == 5 and dropped(exporter, "queue_full") == 3


def test_an_absent_collector_costs_spans_not_time(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens: batches are dropped and counted, one warning, backoff; submit never waits."""

    async def main() -> None:
        exporter = SpanExporter(OtlpEndpoint("127.0.0.1", 9), RESOURCE, max_batch=4, interval=0.05, timeout=0.5)
        async with trio.open_nursery() as n:
            await n.start(exporter.run)
            for i in range(10):
                exporter.submit(span(i))
            await until(lambda: dropped(exporter, "export_failed") >= 4)
            for i in range(10_000):  # the data path only appends to a deque (or drops, counted): never waits
                exporter.submit(span(i))
            await trio.sleep(0.3)
            n.cancel_scope.cancel()
        assert dropped(exporter, "queue_full") > 0  # 10 000 spans over a 4096 queue while backing off
        assert exporter.sent_batches == 0

    with caplog.at_level(logging.WARNING, logger="mesh.tracing"):
        trio.run(main)
    warnings = [r for r in caplog.records if "spans not delivered" in r.getMessage()]
    assert len(warnings) == 1 and "is the trace collector running" in warnings[0].getMessage()


def test_a_collector_that_refuses_is_a_failed_export() -> None:
    async def main(c: Collector) -> None:
        exporter = SpanExporter(OtlpEndpoint("127.0.0.1", c.port), RESOURCE, interval=0.05)
        exporter.submit(span())
        await exporter.flush()
        assert dropped(exporter, "export_failed") == 1 and exporter.metrics.exported._value.get() == 0

    with running(Collector(status=400)) as c:
        trio.run(main, c)


def test_a_slow_collector_never_holds_up_the_event_loop() -> None:
    async def main(c: Collector) -> None:
        exporter = SpanExporter(OtlpEndpoint("127.0.0.1", c.port), RESOURCE, interval=0.01)
        ticks: list[float] = []

        async def data_path() -> None:
            while True:
                ticks.append(trio.current_time())
                exporter.submit(span(len(ticks)))
                await trio.sleep(0.01)

        async with trio.open_nursery() as n:
            await n.start(exporter.run)
            n.start_soon(data_path)
            await until(lambda: len(c.requests) >= 2, timeout=10)
            n.cancel_scope.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
        # Each POST takes 1.5 s, in a worker thread: a loop that waited for one would show a gap of 1.5 s or
        # more; half of that leaves room for a busy machine's scheduling (tests run on two workers).
        assert max(gaps) < 0.75, max(gaps)

    with running(Collector(delay=1.5)) as c:
        trio.run(main, c)


# ---- the embeddable receiver ----------------------------------------------------------------------------


def test_the_receiver_takes_exports_into_a_trace_store() -> None:
    store = TraceStore(max_traces=2)
    with OtlpReceiver(store.add, "127.0.0.1", 0) as receiver:
        async def main() -> None:
            exporter = SpanExporter(OtlpEndpoint.parse(receiver.url), RESOURCE)
            for t in (1, 2, 3):
                exporter.submit(span(1, trace_id=t))
                exporter.submit(span(2, trace_id=t, parent=0x101))
            await exporter.flush()
            assert exporter.metrics.exported._value.get() == 6

        trio.run(main)
        where = client.Endpoint.tcp("127.0.0.1", receiver.port)
        wrong = client.request(where, "POST", "/v1/traces", b"{}", headers={"content-type": "application/json"})
        assert wrong.status == 415 and "x-protobuf" in wrong.text
        bad = client.request(where, "POST", "/v1/traces", b"\xff\xff", headers={"content-type": "application/x-protobuf"})
        assert bad.status == 400
    summaries = store.traces()
    assert [s.trace_id for s in summaries] == [f"{3:032x}", f"{2:032x}"]  # newest first, the oldest dropped
    assert summaries[0].spans == 2 and summaries[0].root == "op-1" and summaries[0].services == ("waypoint.bookinfo",)
    assert [s.name for s in store.trace(f"{3:032x}")] == ["op-1", "op-2"] and store.received == 6
