"""The dashboard's JSON API, run as the process runs it (its Router), against a canned Prometheus served over
HTTP, canned control plane and agent answers, and spans POSTed to its OTLP/HTTP receiver."""

from __future__ import annotations

import datetime
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.serve import client
from mesh.serve.routes import Request, Response, Router
from mesh.serve.thread import ServerThread
from mesh.tracing.otlp import CONTENT_TYPE, encode
from mesh.tracing.receiver import TraceStore
from mesh.tracing.span import Resource, Span, SpanKind, StatusCode
from meshctl.dashboard.api import DashboardApi, SourceLog, TraceSetup
from meshctl.dashboard.errors import SourceError
from meshctl.dashboard.prom import PromClient
from meshctl.dashboard.traces import ReceivedTraces

NS = "bookinfo"
NOW = 1_800_000_000.0
WAYPOINT_PRINCIPAL = "spiffe://cluster.local/ns/bookinfo/sa/waypoint"


def vector(*samples: tuple[dict[str, str], float]) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": m, "value": [NOW, str(v)]} for m, v in samples]}}


def edge_labels(**extra: str) -> dict[str, str]:
    out = {"namespace": NS, "pod": "waypoint", "source_workload": "sleep", "source_workload_namespace": NS,
           "destination_workload": "details-v1", "destination_workload_namespace": NS,
           "destination_service": "details.bookinfo.svc.cluster.local", "destination_service_namespace": NS,
           "connection_security_policy": "mutual_tls"}
    out.update(extra)
    return out


def canned(request: Request) -> Response:
    """A Prometheus that knows one edge (sleep -> details-v1 through the waypoint) and which targets are up."""
    q = request.query.get("query", "")
    if request.path == "/api/v1/query_range":
        return Response.json({"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": {}, "values": [[NOW - 30, "1.5"], [NOW, "2"]]}]}})
    if q == "up":
        return Response.json(vector(({"job": "controlplane"}, 1), ({"job": "nodeagent", "node": "node-1"}, 1),
                                    ({"job": "waypoint", "namespace": NS, "pod": "waypoint"}, 0)))
    if "istio_request_duration_milliseconds_bucket" in q:
        return Response.json(vector((edge_labels(le="10"), 0.2), (edge_labels(le="100"), 0.3),
                                    (edge_labels(le="+Inf"), 0.3)))
    if "istio_requests_total" in q:
        rate = "rate(" in q
        return Response.json(vector((edge_labels(response_code="200"), 0.2 if rate else 40),
                                    (edge_labels(response_code="503"), 0.1 if rate else 2)))
    if "istio_tcp" in q:
        return Response.json(vector())
    return Response.json({"status": "error", "error": f"unexpected query {q}"}, 400)


@pytest.fixture(scope="module")
def prometheus() -> Iterator[client.Endpoint]:
    router = Router().add("/api/v1/query", canned).add("/api/v1/query_range", canned)
    with ServerThread("canned-prometheus").tcp(router, "127.0.0.1", 0, name="prometheus") as servers:
        yield client.Endpoint.tcp("127.0.0.1", int(servers.addresses[0]))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RECORD: dict[str, Any] = {
    "name": "t-unit",
    "processes": [{"name": "controlplane", "running": True}, {"name": "nodeagent node-1", "running": True},
                  {"name": "waypoint bookinfo/waypoint", "running": True}, {"name": "prometheus", "running": True}],
    "plan": {"underlay": {"netns": "amb.t-unit.underlay", "gateway": "172.30.0.1"},
             "nodes": [{"name": "node-1", "redirectMode": "iptables"}],
             "pods": [{"namespace": NS, "name": "details-v1", "node": "node-1", "ip": "10.244.1.2", "running": True,
                       "serviceAccount": "bookinfo-details", "labels": {"app": "details", "version": "v1"}},
                      {"namespace": NS, "name": "waypoint", "node": "node-1", "ip": "10.244.1.9", "running": True,
                       "serviceAccount": "waypoint", "waypoint": True, "labels": {}}]},
}
CONNECTIONS = {"version": "v7", "errors": [], "clients": [
    {"role": "nodeagent", "node": "node-1", "acked_version": "v7", "identity": "node-1", "types": {"Workload": {}}},
    {"role": "waypoint", "node": "node-1", "namespace": NS, "name": "waypoint", "acked_version": "v6",
     "identity": WAYPOINT_PRINCIPAL, "types": {"L7Config": {"pending": True}}}]}
RESOURCES = [
    {"kind": "Service", "metadata": {"namespace": NS, "name": "details"}, "spec": {"selector": {"app": "details"}}},
    {"kind": "AuthorizationPolicy", "metadata": {"namespace": NS, "name": "details-viewer"},
     "spec": {"selector": {"matchLabels": {"app": "details"}}, "action": "ALLOW", "rules": [{}]}},
]


class FakeSources:
    cluster = "t-unit"

    def __init__(self, prometheus: client.Endpoint, control_plane: bool = True) -> None:
        self.endpoint = prometheus
        self.control_plane = control_plane

    def record(self) -> dict[str, Any]:
        return RECORD

    def prometheus(self) -> PromClient:
        return PromClient(self.endpoint, timeout=1.0)

    def connections(self) -> dict[str, Any]:
        if not self.control_plane:
            raise SourceError("controlplane", "cannot reach the control plane at /x/debug.sock")
        return CONNECTIONS

    def resources(self) -> list[dict[str, Any]]:
        if not self.control_plane:
            raise SourceError("controlplane", "cannot read the configuration")
        return RESOURCES

    def certificates(self, record: Any) -> tuple[list[tuple[str, dict[str, Any]]], list[SourceError]]:
        expiry = datetime.datetime.fromtimestamp(NOW + 1800, datetime.UTC).isoformat()
        return ([("nodeagent node-1", {"certificates": [
            {"identity": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details", "state": "valid",
             "serial": "ab12", "not_after": expiry}]})],
                [SourceError("waypoint", "waypoint bookinfo/waypoint: its admin endpoint did not answer")])


def api_for(sources: FakeSources, store: TraceStore | None = None, note: str = "") -> Router:
    store = store or TraceStore()
    setup = TraceSetup(ReceivedTraces(store, "this dashboard"), note, "http://172.30.0.1:4318/v1/traces", store.add)
    return DashboardApi(sources, setup, refresh=1.0, clock=lambda: NOW, source_log=SourceLog()).router()


def get(router: Router, target: str) -> tuple[int, Any]:
    answer = router(Request.parse("GET", target))
    return answer.status, json.loads(answer.body)


def test_graph_from_prometheus(prometheus: client.Endpoint) -> None:
    status, body = get(api_for(FakeSources(prometheus)), "/api/graph?namespace=bookinfo")
    assert status == 200 and body["warnings"] == []
    (edge,) = body["edges"]
    assert {k: edge[k] for k in ("source", "destination", "requests", "errors", "mtls", "waypoint")} == {
        "source": "sleep", "destination": "details-v1", "requests": 42, "errors": 2, "mtls": True,
        "waypoint": "bookinfo/waypoint"}
    assert edge["error_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert edge["p99"] == pytest.approx(10 + 90 * (0.99 * 0.3 - 0.2) / 0.1, abs=1e-3)
    assert {n["kind"] for n in body["nodes"]} == {"workload", "service", "waypoint"}


def test_prometheus_down_is_a_banner_and_one_warning(caplog: pytest.LogCaptureFixture,
                                                     prometheus: client.Endpoint) -> None:
    router = api_for(FakeSources(client.Endpoint.tcp("127.0.0.1", closed_port())))
    with caplog.at_level(logging.INFO, logger="meshctl.dashboard"):
        for _ in range(3):
            status, body = get(router, "/api/graph?namespace=bookinfo")
            assert status == 200 and body["edges"] == [] and body["nodes"] == []
            (warning,) = body["warnings"]
            assert warning["source"] == "prometheus" and "unreachable" in warning["message"]
            assert "meshctl cluster status" in warning["message"]
        status, body = get(router, "/api/health")
        assert status == 200 and any(w["source"] == "prometheus" for w in body["warnings"])
        assert {c["kind"]: c["scraped"] for c in body["health"]["components"]}["controlplane"] is None
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage().startswith("prometheus")]
    assert len(warned) == 1  # once a minute at most, not once a request


def test_a_source_that_answers_again_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    log = SourceLog(every=60, clock=time.monotonic)
    with caplog.at_level(logging.INFO, logger="meshctl.dashboard"):
        log.failed(SourceError("prometheus", "down"))
        log.failed(SourceError("prometheus", "down"))
        log.ok("prometheus")
        log.ok("prometheus")
    assert [r.getMessage() for r in caplog.records] == ["prometheus: down", "prometheus answers again"]


def test_bad_input_is_a_400_not_an_error_page(prometheus: client.Endpoint) -> None:
    router = api_for(FakeSources(prometheus))
    for target in ("/api/graph", "/api/graph?namespace=bookinfo&window=1y", "/api/trace?id=xyz",
                   "/api/workload?namespace=bookinfo", "/api/traces?limit=many"):
        status, body = get(router, target)
        assert status == 400 and body["error"], target
    status, body = get(router, "/api/workload?namespace=bookinfo&name=nope")
    assert status == 404 and "nope" in body["error"]


def _span(trace_id: int, span_id: int, parent: int, name: str, start: int, end: int, **attrs: Any) -> Span:
    return Span(trace_id, span_id, parent, name, SpanKind.SERVER, start, end, tuple(attrs.items()),
                StatusCode.ERROR if attrs.get("error") else StatusCode.UNSET)


def _post(router: Router, body: bytes, content_type: str = CONTENT_TYPE) -> Response:
    return router(Request.parse("POST", "/v1/traces", body=body, headers=[("content-type", content_type)]))


def test_spans_received_over_otlp_are_traces(prometheus: client.Endpoint) -> None:
    router = api_for(FakeSources(prometheus))
    t0 = 1_700_000_000_000_000_000
    waypoint = Resource.of({"service.name": "waypoint.bookinfo", "service.instance.id": "bookinfo/waypoint",
                            "istio.proxy": "waypoint"})
    agent = Resource.of({"service.name": "nodeagent", "service.instance.id": "node-2"})
    tid = 0xABC
    spans = [
        _span(tid, 1, 0, "productpage.bookinfo.svc.cluster.local:9080/*", t0, t0 + 30_000_000),
        _span(tid, 2, 1, "reviews.bookinfo.svc.cluster.local:9080/*", t0 + 5_000_000, t0 + 20_000_000),
        _span(tid, 4, 2, "ratings.bookinfo.svc.cluster.local:9080/*", t0 + 8_000_000, t0 + 12_000_000, error=True),
    ]
    assert _post(router, encode(waypoint, spans)).status == 200
    tunnel = [_span(tid, 3, 1, "inbound tunnel 10.244.2.3:9080", t0 + 1_000_000, t0 + 29_000_000,
                    **{"hbone.authority": "10.244.2.3:9080"})]
    assert _post(router, encode(agent, tunnel)).status == 200
    assert _post(router, b"\xff\x00 not protobuf").status == 400
    assert _post(router, b"{}", "application/json").status == 415

    status, body = get(router, "/api/traces?service=ratings")
    assert status == 200
    (trace,) = body["traces"]
    assert trace["trace_id"] == f"{tid:032x}" and trace["span_count"] == 4 and trace["errors"] == 1
    assert trace["proxies"] == ["nodeagent node-2", "waypoint bookinfo/waypoint"]
    assert trace["services"] == ["productpage", "ratings", "reviews"]
    assert trace["duration"] == 30.0
    first = trace["spans"][0]
    assert {k: first[k] for k in ("service", "proxy", "offset", "duration", "status", "depth")} == {
        "service": "productpage", "proxy": "waypoint bookinfo/waypoint", "offset": 0.0, "duration": 30.0,
        "status": "ok", "depth": 0}
    assert first["start"] == t0 / 1e6
    assert get(router, "/api/traces?service=details")[1]["traces"] == []

    status, body = get(router, f"/api/trace?id={tid:x}")
    flow = [(s["depth"], s["service"] or s["name"], s["status"]) for s in body["trace"]["spans"]]
    assert flow == [(0, "productpage", "ok"), (1, "inbound tunnel 10.244.2.3:9080", "ok"), (1, "reviews", "ok"),
                    (2, "ratings", "error")]
    assert get(router, "/api/trace?id=1234")[0] == 404


def test_a_trace_note_is_a_banner(prometheus: client.Endpoint) -> None:
    router = api_for(FakeSources(prometheus), note="the cluster's proxies export no spans")
    status, body = get(router, "/api/traces")
    assert status == 200 and body["warnings"] == [{"source": "traces", "message": "the cluster's proxies export no spans"}]


def test_health(prometheus: client.Endpoint) -> None:
    status, body = get(api_for(FakeSources(prometheus)), "/api/health")
    health = body["health"]
    assert status == 200 and health["control_plane"] == {"version": "v7", "clients": 2, "errors": []}
    comps = {c["name"]: c for c in health["components"]}
    assert comps["nodeagent node-1"]["config"] == "SYNCED" and comps["nodeagent node-1"]["current"] is True
    assert comps["nodeagent node-1"]["scraped"] is True and comps["nodeagent node-1"]["redirect_mode"] == "iptables"
    wp = comps["waypoint"]
    assert (wp["config"], wp["acked_version"], wp["current"], wp["scraped"]) == ("STALE", "v6", False, False)
    (cert,) = health["certificates"]
    assert cert["expires_in"] == 1800 and cert["expiring"] is True and cert["holder"] == "nodeagent node-1"
    assert body["warnings"] == [{"source": "waypoint",
                                 "message": "waypoint bookinfo/waypoint: its admin endpoint did not answer"}]


def test_health_without_a_control_plane(prometheus: client.Endpoint) -> None:
    status, body = get(api_for(FakeSources(prometheus, control_plane=False)), "/api/health")
    assert status == 200 and body["health"]["control_plane"] is None
    assert {c["name"]: c.get("config") for c in body["health"]["components"]}["nodeagent node-1"] is None
    assert body["warnings"][0]["source"] == "controlplane"


def test_workload(prometheus: client.Endpoint) -> None:
    status, body = get(api_for(FakeSources(prometheus)), "/api/workload?namespace=bookinfo&name=details-v1&minutes=5")
    w = body["workload"]
    assert status == 200 and w["identity"] == "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details"
    assert w["pods"] == [{"name": "details-v1", "node": "node-1", "ip": "10.244.1.2", "running": True, "waypoint": False}]
    assert [p["name"] for p in w["policies"]] == ["details-viewer"]
    assert w["services"] == ["details.bookinfo.svc.cluster.local"]
    first = w["charts"][0]
    assert first["title"] == "Inbound requests" and first["series"][0]["points"] == [[NOW - 30, 1.5], [NOW, 2.0]]
    assert w["range"] == {"start": NOW - 300, "end": NOW, "step": 2.0}


def test_the_page_and_its_files(prometheus: client.Endpoint) -> None:
    router = api_for(FakeSources(prometheus))
    page = router(Request.parse("GET", "/"))
    assert page.status == 200 and page.content_type.startswith("text/html") and b"/static/app.js" in page.body
    script = router(Request.parse("GET", "/static/app.js"))
    assert script.status == 200 and script.content_type.startswith("text/javascript")
    assert router(Request.parse("GET", "/static/style.css")).status == 200
    status, body = get(router, "/api/config")
    assert body["cluster"] == "t-unit" and body["refresh"] == 1.0
    assert get(router, "/api/namespaces")[1]["namespaces"] == [NS]
