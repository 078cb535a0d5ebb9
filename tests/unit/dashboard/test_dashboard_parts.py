"""The pure parts: a workload's policies and routes, where spans are received, what a span is about, Jaeger."""

from __future__ import annotations

import pytest

from mesh.tracing.otlp import ReceivedSpan
from meshctl.dashboard.app import plan_receiver
from meshctl.dashboard.errors import DashboardError
from meshctl.dashboard.traces import parse_jaeger, proxy_of, service_of
from meshctl.dashboard.workload import chart_queries, fqdn, view

NS = "bookinfo"
PODS = [{"namespace": NS, "name": "reviews-v2", "node": "node-2", "ip": "10.244.2.3", "running": True,
         "serviceAccount": "bookinfo-reviews", "labels": {"app": "reviews", "version": "v2"}}]


def doc(kind: str, name: str, spec: dict, namespace: str = NS, labels: dict | None = None) -> dict:
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace, "labels": labels or {}}, "spec": spec}


RESOURCES = [
    {"kind": "Namespace", "metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient",
                                                              "istio.io/use-waypoint": "waypoint"}}},
    doc("Service", "reviews", {"selector": {"app": "reviews"}}),
    doc("Service", "ratings", {"selector": {"app": "ratings"}}),
    doc("DestinationRule", "reviews", {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                                      {"name": "v2", "labels": {"version": "v2"}}]}),
    doc("VirtualService", "reviews", {"hosts": ["reviews"], "http": [
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                   {"destination": {"host": "reviews.bookinfo.svc.cluster.local", "subset": "v2"}, "weight": 10}],
         "retries": {"attempts": 2}}]}),
    doc("VirtualService", "ratings", {"hosts": ["ratings"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}),
    doc("AuthorizationPolicy", "mesh-deny", {"action": "DENY", "rules": [{}]}, namespace="istio-system"),
    doc("AuthorizationPolicy", "ns-allow", {"rules": [{}]}),
    doc("AuthorizationPolicy", "reviews-v2-only", {"selector": {"matchLabels": {"version": "v2"}}, "rules": []}),
    doc("AuthorizationPolicy", "reviews-v1-only", {"selector": {"matchLabels": {"version": "v1"}}}),
    doc("AuthorizationPolicy", "at-waypoint", {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
                                               "action": "DENY", "rules": [{}]}),
    doc("AuthorizationPolicy", "other-service", {"targetRefs": [{"kind": "Service", "name": "ratings"}]}),
    doc("AuthorizationPolicy", "selected-elsewhere", {"selector": {"matchLabels": {"app": "reviews"}}}, namespace="other"),
    doc("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}}),
]


def test_a_workloads_identity_policies_and_routes() -> None:
    w = view(NS, "reviews-v2", PODS, RESOURCES)
    assert w is not None
    assert w["identity"] == "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    assert (w["dataplane_mode"], w["waypoint"]) == ("ambient", "waypoint")
    assert w["services"] == ["reviews.bookinfo.svc.cluster.local"]
    applies = {p["name"]: p["applies"] for p in w["policies"]}
    assert applies == {"mesh-deny": "mesh-wide", "ns-allow": "namespace-wide", "reviews-v2-only": "selector version=v2",
                       "at-waypoint": "targets service reviews (enforced by its waypoint)", "strict": "namespace-wide"}
    assert {p["name"]: p.get("mode") or p.get("action") for p in w["policies"]}["strict"] == "STRICT"
    routes = [(r["virtualservice"], r["route"], r["match"], r["subset"], r["weight"], r["extras"]) for r in w["routes"]]
    assert routes == [("bookinfo/reviews", "jason", "header end-user exact jason", "v2", 100, []),
                      ("bookinfo/reviews", "http[1]", "any", "v2", 10, ["retries"])]
    assert view(NS, "nope", PODS, RESOURCES) is None


def test_hosts_resolve_as_istio_resolves_short_names() -> None:
    assert fqdn("reviews", "bookinfo") == "reviews.bookinfo.svc.cluster.local"
    assert fqdn("reviews.other", "bookinfo") == "reviews.other.svc.cluster.local"
    assert fqdn("reviews.other.svc.cluster.local", "bookinfo") == "reviews.other.svc.cluster.local"


def test_chart_queries_quote_the_workload() -> None:
    exprs = [e for _, _, e in chart_queries(NS, "reviews-v2")]
    assert all('"reviews-v2"' in e for e in exprs)
    assert any("histogram_quantile(0.99" in e for e in exprs)


RECORD = {"plan": {"underlay": {"gateway": "172.30.0.1", "netns": "amb.x.underlay"}}}


def with_endpoint(url: str) -> dict:
    return {**RECORD, "observability": {"tracing": {"otlpEndpoint": url}}}


def test_where_spans_are_received() -> None:
    p = plan_receiver(with_endpoint("http://172.30.0.1:4318/v1/traces"), None, None)
    assert (p.host, p.port, p.netns, p.note) == ("172.30.0.1", 4318, "amb.x.underlay", "")
    p = plan_receiver(with_endpoint("http://172.30.0.1:14318/v1/traces"), None, None)
    assert p.port == 14318
    p = plan_receiver(RECORD, None, None)  # the cluster exports nowhere: listen, and say how to export here
    assert (p.host, p.port) == ("172.30.0.1", 4318) and "--otlp-endpoint http://172.30.0.1:4318/v1/traces" in p.note
    p = plan_receiver(with_endpoint("http://10.0.0.5:4318/v1/traces"), None, None)  # another collector
    assert p.host is None and "--jaeger-url" in p.note
    assert plan_receiver(with_endpoint("http://10.0.0.5:4318"), None, "http://127.0.0.1:16686").host is None
    p = plan_receiver(RECORD, "127.0.0.1:14318", None)
    assert (p.host, p.port, p.netns) == ("127.0.0.1", 14318, None)
    assert plan_receiver(RECORD, "none", None).host is None
    with pytest.raises(DashboardError, match="HOST:PORT"):
        plan_receiver(RECORD, "nowhere", None)


def received(name: str, resource: dict, **attrs: object) -> ReceivedSpan:
    return ReceivedSpan("a" * 32, "b" * 16, "", name, 2, 0, 1_000_000, dict(attrs), resource)  # type: ignore[arg-type]


def test_what_a_span_is_about_and_who_reported_it() -> None:
    wp = {"service.name": "waypoint.bookinfo", "service.instance.id": "bookinfo/waypoint", "istio.proxy": "waypoint"}
    agent = {"service.name": "nodeagent", "service.instance.id": "node-1"}
    assert service_of(received("reviews.bookinfo.svc.cluster.local:9080/*", wp)) == "reviews.bookinfo.svc.cluster.local"
    assert proxy_of(received("x", wp)) == "waypoint bookinfo/waypoint"
    out = received("outbound tunnel 10.96.0.10:9080", agent, **{"destination.service": "ratings.bookinfo.svc.cluster.local"})
    assert service_of(out) == "ratings.bookinfo.svc.cluster.local" and proxy_of(out) == "nodeagent node-1"
    assert service_of(received("inbound tunnel 10.244.2.3:9080", agent)) == ""
    assert service_of(received("x", wp, upstream_cluster="outbound|9080|v1|details.bookinfo.svc.cluster.local")) == \
        "details.bookinfo.svc.cluster.local"


def test_jaeger_answers_become_spans() -> None:
    answer = {"data": [{"traceID": "abc", "processes": {"p1": {"serviceName": "waypoint.bookinfo", "tags": [
        {"key": "service.instance.id", "type": "string", "value": "bookinfo/waypoint"}]}}, "spans": [
        {"traceID": "abc", "spanID": "01", "operationName": "productpage.bookinfo.svc.cluster.local:9080/*",
         "references": [], "startTime": 1000, "duration": 500, "processID": "p1",
         "tags": [{"key": "span.kind", "value": "server"}]},
        {"traceID": "abc", "spanID": "02", "operationName": "reviews.bookinfo.svc.cluster.local:9080/*",
         "references": [{"refType": "CHILD_OF", "traceID": "abc", "spanID": "01"}], "startTime": 1100,
         "duration": 200, "processID": "p1", "tags": [{"key": "error", "value": True}]}]}]}
    ((trace_id, spans),) = parse_jaeger(answer)
    assert trace_id == "abc".rjust(32, "0")
    assert [(s.span_id, s.parent_span_id, s.start_ns, s.end_ns, s.status_code) for s in spans] == [
        ("01", "", 1_000_000, 1_500_000, 0), ("02", "01", 1_100_000, 1_300_000, 2)]
    assert proxy_of(spans[0]) == "waypoint bookinfo/waypoint"
