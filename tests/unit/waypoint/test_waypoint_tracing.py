"""The waypoint's spans: every request continues or starts a trace, the Telemetry percentage and the caller's
decision choose what is recorded, the service gets the waypoint's span as parent (W3C and B3), and the HBONE
CONNECT to the endpoint carries it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from google.protobuf import json_format, struct_pb2
from waypoint_harness import WAYPOINT, request, running_proxy, service, start_backend, table, workload

from mesh.hbone.headers import Header
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.tracing.span import Span, SpanKind, StatusCode
from mesh.tracing.tracer import Tracer
from waypoint.config import compile_table
from waypoint.l7.model import Endpoint
from waypoint.upstream.connect import HboneUpstream
from waypoint.upstream.pool import TcpUpstream

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


class Sink:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def submit(self, span: Span) -> None:
        self.spans.append(span)


def telemetry(name: str, spec: dict[str, Any], ns: str = "bookinfo", waypoints: tuple[str, ...] = (WAYPOINT,)) -> pb.L7Config:
    s = struct_pb2.Struct()
    json_format.ParseDict(spec, s)
    return pb.L7Config(kind=pb.TELEMETRY, name=name, namespace=ns, api_version="telemetry.istio.io/v1",
                       waypoints=list(waypoints), spec=s)


def sampling(pct: float, **entry: Any) -> dict[str, Any]:
    return {"tracing": [{"randomSamplingPercentage": pct, **entry}]}


def run(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(15):
            await fn()
    trio.run(main)


def test_telemetry_reaches_the_route_table() -> None:
    configs = [telemetry("mesh-default", sampling(5.0), ns="istio-system"), telemetry("ns", sampling(50.0)),
               telemetry("elsewhere", sampling(70.0), waypoints=("other/waypoint",))]
    tbl = compile_table(WAYPOINT, [], [], configs).table
    assert tbl.tracing.percentage == 50.0 and tbl.tracing.sources == ("istio-system/mesh-default", "bookinfo/ns")
    bad = compile_table(WAYPOINT, [], [], [telemetry("bad", {"tracing": [{"randomSamplingPercentage": 300}]})])
    assert bad.failed and bad.table.tracing.percentage is None  # left out, as any resource that fails


async def _traced(configs: list[pb.L7Config], headers: tuple = (), path: str = "/reviews/1",
                  sampling_default: float = 1.0) -> tuple[Sink, dict[str, Any], int]:
    sink = Sink()
    async with trio.open_nursery() as n:
        backend = await start_backend(n, "v1")
        tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], configs)
        async with running_proxy(tbl, tracer=Tracer(sink, sampling=sampling_default)) as (_, front, log, _n):
            head, body = await request(front.port, path, headers=headers)
            with trio.fail_after(2):
                while not log:
                    await trio.sleep(0.005)
        n.cancel_scope.cancel()
    seen = json.loads(body) if body.startswith(b"{") else {}
    return sink, seen.get("headers", {}), head.status


def test_a_sampled_incoming_trace_is_continued_and_recorded() -> None:
    async def main() -> None:
        sink, seen, status = await _traced([telemetry("off", sampling(0.0))], headers=(
            ("traceparent", f"00-{TRACE}-{SPAN}-01"), ("tracestate", "rojo=1"), ("user-agent", "curl/8"),
            ("x-request-id", "req-1")))
        assert status == 200
        (span,) = sink.spans  # 0% by Telemetry, but the caller sampled: parent-based
        assert f"{span.trace_id:032x}" == TRACE and f"{span.parent_span_id:016x}" == SPAN
        assert span.kind is SpanKind.SERVER and span.name == "reviews.bookinfo.svc.cluster.local:9080/*"
        assert span.end_ns >= span.start_ns and span.status is StatusCode.UNSET and span.trace_state == "rojo=1"
        attrs = dict(span.attributes)
        assert attrs["http.method"] == "GET" and attrs["http.status_code"] == 200
        assert attrs["http.url"] == "http://reviews:9080/reviews/1" and attrs["guid:x-request-id"] == "req-1"
        assert attrs["user_agent"] == "curl/8" and attrs["upstream_cluster"].startswith("outbound|9080|")
        assert attrs["istio.canonical_service"] == "waypoint" and attrs["istio.namespace"] == "bookinfo"
        # The service sees the waypoint's span as its parent, in both notations.
        assert seen["traceparent"] == f"00-{TRACE}-{span.span_id:016x}-01" and seen["tracestate"] == "rojo=1"
        assert seen["x-b3-traceid"] == TRACE and seen["x-b3-spanid"] == f"{span.span_id:016x}"
        assert seen["x-b3-parentspanid"] == SPAN and seen["x-b3-sampled"] == "1" and "b3" not in seen
    run(main)


def test_unsampled_requests_propagate_ids_but_record_nothing() -> None:
    async def main() -> None:
        sink, seen, _ = await _traced([telemetry("off", sampling(0.0))])
        assert sink.spans == []
        trace, span, flags = seen["traceparent"].split("-")[1:]
        assert flags == "00" and seen["x-b3-sampled"] == "0" and seen["x-b3-traceid"] == trace
        assert "x-b3-parentspanid" not in seen  # a root span
        # The caller said no: not recorded even at 100%.
        sink, seen, _ = await _traced([telemetry("all", sampling(100.0))],
                                      headers=(("traceparent", f"00-{TRACE}-{SPAN}-00"),))
        assert sink.spans == [] and seen["traceparent"].endswith("-00")
    run(main)


def test_telemetry_samples_new_traces_and_can_stop_reporting() -> None:
    async def main() -> None:
        sink, seen, _ = await _traced([telemetry("all", sampling(100.0, customTags={
            "team": {"literal": {"value": "books"}}, "user": {"header": {"name": "end-user", "defaultValue": "-"}}}))],
            headers=(("end-user", "jason"),))
        (span,) = sink.spans
        assert span.parent_span_id == 0 and seen["traceparent"] == f"00-{span.trace_id:032x}-{span.span_id:016x}-01"
        assert dict(span.attributes)["team"] == "books" and dict(span.attributes)["user"] == "jason"
        sink, seen, _ = await _traced([telemetry("quiet", sampling(100.0, disableSpanReporting=True))])
        assert sink.spans == [] and seen["traceparent"].endswith("-01")  # sampled downstream, not reported here
        sink, _, _ = await _traced([], sampling_default=100.0)  # no Telemetry: the waypoint's --trace-sampling
        assert len(sink.spans) == 1
    run(main)


def test_b3_in_b3_out_and_errors_are_marked() -> None:
    async def main() -> None:
        sink, seen, _ = await _traced([], headers=(("b3", f"{TRACE}-{SPAN}-1"),))
        (span,) = sink.spans
        assert seen["b3"] == f"{TRACE}-{span.span_id:016x}-1-{SPAN}" and seen["x-b3-parentspanid"] == SPAN
        assert seen["traceparent"].startswith(f"00-{TRACE}-")
        sink, _, status = await _traced([], path="/status/503", headers=(("x-b3-traceid", TRACE),
                                                                         ("x-b3-spanid", SPAN), ("x-b3-sampled", "1")))
        (failed,) = sink.spans
        assert status == 503 and failed.status is StatusCode.ERROR and dict(failed.attributes)["error"] is True
        assert f"{failed.trace_id:032x}" == TRACE
    run(main)


def test_the_connect_to_the_endpoint_carries_the_requests_trace_context() -> None:
    class Recording(TcpUpstream):
        def __init__(self) -> None:
            self.traceparents: list[str] = []

        async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                          traceparent: str = "") -> trio.abc.HalfCloseableStream:
            self.traceparents.append(traceparent)
            return await super().connect(endpoint, service=service, client=client)

    async def main() -> None:
        sink, upstream = Sink(), Recording()
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl, tracer=Tracer(sink)) as (proxy, front, _log, _n):
                proxy.upstream = upstream
                proxy.pool.upstream = upstream
                _, body = await request(front.port, "/reviews/1", headers=(("traceparent", f"00-{TRACE}-{SPAN}-01"),))
            n.cancel_scope.cancel()
        assert upstream.traceparents == [json.loads(body)["headers"]["traceparent"]]

        # ... and HBONE puts it on the CONNECT.
        class Pool:
            headers: list[Header] = []

            async def open_tunnel(self, key: object, authority: str, headers: list[Header]) -> Any:
                Pool.headers = list(headers)
                return None

        hbone = HboneUpstream(Pool(), SpiffeId("cluster.local", "bookinfo", "waypoint"))  # type: ignore[arg-type]
        await hbone.connect(Endpoint("10.244.1.5", 9080, hbone=True, identity="spiffe://cluster.local/ns/bookinfo/sa/r"),
                            traceparent=f"00-{TRACE}-{SPAN}-01")
        assert ("traceparent", f"00-{TRACE}-{SPAN}-01") in Pool.headers
    run(main)
