"""HTTPRoute and GRPCRoute through the production assembly, without sockets: the store, the control plane's
translation, the waypoint's compilation of what it is sent (`waypoint.config.compile_table`) and the
waypoint's routing decision (`waypoint.l7.routing.decide`); and the routes' status."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from controlplane.translate.gatewayapi import percentages, route_statuses
from controlplane.translate.snapshot import Translation, translate_snapshot
from mesh.api.client import ApiClient
from mesh.api.loader import load_paths, parse_text
from mesh.api.validate import Ref
from waypoint.config import RouteTable, compile_table
from waypoint.l7.model import ClientInfo, RequestHead
from waypoint.l7.routing import RouteDecision, decide

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "istio"
HOST = "reviews.default.svc.cluster.local"
CLIENT = ClientInfo("spiffe://cluster.local/ns/default/sa/bookinfo-productpage", "10.244.1.10:40000", "10.96.0.13:9080")

VERSIONS = """
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}], clusterIP: 10.96.0.21}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: default}
spec: {selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}], clusterIP: 10.96.0.22}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v3, namespace: default}
spec: {selector: {app: reviews, version: v3}, ports: [{name: http, port: 9080}], clusterIP: 10.96.0.23}
"""


@pytest.fixture
def store() -> Store:
    s = Store()
    s.apply(load_paths([str(FIXTURES / "bookinfo-platform.yaml")]))
    s.apply(load_paths([str(FIXTURES / "destination-rule-all.yaml"), str(FIXTURES / "waypoint.yaml")]))
    s.apply(parse_text(VERSIONS, "versions.yaml"))
    s.label(Ref("Namespace", "", "default"), {"istio.io/use-waypoint": "waypoint"})
    return s


def route(spec: dict[str, Any], name: str = "reviews", kind: str = "HTTPRoute",
          parent: dict[str, Any] | None = None) -> str:
    body = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind, "metadata": {"name": name, "namespace": "default"},
            "spec": {"parentRefs": [parent or {"group": "", "kind": "Service", "name": "reviews", "port": 9080}], **spec}}
    return yaml.safe_dump(body)


def backend(name: str, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": 9080, **extra}
    if weight is not None:
        out["weight"] = weight
    return out


def table(store: Store, *docs: str) -> tuple[RouteTable, Translation]:
    for i, text in enumerate(docs):
        store.apply(parse_text(text, f"route{i}.yaml"))
    t = translate_snapshot(store.snapshot())
    result = compile_table("default/waypoint", t.workloads.values(), t.services.values(), t.l7.values(), t.version)
    assert not result.errors, result.errors
    return result.table, t


def go(tbl: RouteTable, path: str = "/reviews/0", method: str = "GET", seed: int = 1, **headers: str) -> RouteDecision:
    head = RequestHead(method, path, "reviews:9080", tuple((k.replace("_", "-"), v) for k, v in headers.items()))
    return decide(tbl, head, CLIENT, random.Random(seed))


def to(d: RouteDecision) -> str:
    assert d.cluster is not None, d
    return d.cluster.hostname.split(".")[0]


def test_weighted_backends_split_as_written(store: Store) -> None:
    tbl, _ = table(store, route({"rules": [{"backendRefs": [backend("reviews-v1", 90), backend("reviews-v2", 10)]}]}))
    rng = random.Random(5)
    head = RequestHead("GET", "/reviews/0", "reviews:9080")
    counts = Counter(to(decide(tbl, head, CLIENT, rng)) for _ in range(4000))
    assert set(counts) == {"reviews-v1", "reviews-v2"}
    assert abs(counts["reviews-v1"] / 4000 - 0.9) < 0.03, counts
    d = decide(tbl, head, CLIENT, rng)
    assert d.cluster is not None and [e.name for e in d.cluster.endpoints] in (["reviews-v1"], ["reviews-v2"])


def test_weights_become_percentages() -> None:
    assert percentages([90, 10]) == [90, 10]
    assert percentages([1, 2]) == [33, 67]
    assert percentages([1, 1, 1]) == [34, 33, 33]
    assert percentages([3]) == [100]
    assert sum(percentages([7, 13, 1000, 999999])) == 100


def test_matches_across_routes_follow_gateway_api_precedence(store: Store) -> None:
    # Written in the worst order, in two routes: the most specific must still win.
    tbl, _ = table(
        store,
        route({"rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [backend("reviews-v1")]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": [backend("reviews-v2")]},
        ]}, name="a-general"),
        route({"rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v2"}}], "backendRefs": [backend("reviews-v3")]},
            {"matches": [{"path": {"type": "Exact", "value": "/api"}, "method": "POST"}],
             "backendRefs": [backend("reviews-v3")]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                          "headers": [{"name": "End-User", "value": "jason"}]}],
             "backendRefs": [backend("reviews-v3")]},
        ]}, name="b-specific"),
    )
    assert to(go(tbl, "/other")) == "reviews-v1"
    assert to(go(tbl, "/api")) == "reviews-v2"
    assert to(go(tbl, "/api/x?q=1")) == "reviews-v2"
    assert to(go(tbl, "/apix")) == "reviews-v1"  # PathPrefix is segment-wise
    assert to(go(tbl, "/api/v2/x")) == "reviews-v3"  # the longer prefix, though in the later route
    assert to(go(tbl, "/api", method="POST")) == "reviews-v3"  # Exact over any prefix
    assert to(go(tbl, "/api/x", end_user="jason")) == "reviews-v3"  # a header match over none


def test_header_query_and_method_matches(store: Store) -> None:
    tbl, _ = table(store, route({"rules": [
        {"matches": [{"headers": [{"name": "end-user", "value": "jason"}]}], "backendRefs": [backend("reviews-v2")]},
        {"matches": [{"headers": [{"type": "RegularExpression", "name": "x-id", "value": "[0-9]+"}]}],
         "backendRefs": [backend("reviews-v3")]},
        {"matches": [{"queryParams": [{"name": "v", "value": "3"}], "method": "GET"}], "backendRefs": [backend("reviews-v3")]},
        {"backendRefs": [backend("reviews-v1")]},
    ]}))
    assert to(go(tbl, end_user="jason")) == "reviews-v2"
    assert to(go(tbl, end_user="json")) == "reviews-v1"
    assert to(go(tbl, x_id="123")) == "reviews-v3"
    assert to(go(tbl, x_id="12a")) == "reviews-v1"
    assert to(go(tbl, "/reviews/0?v=3")) == "reviews-v3"
    assert to(go(tbl, "/reviews/0?v=3", method="HEAD")) == "reviews-v1"


def test_filters_rewrite_headers_mirror_and_timeouts(store: Store) -> None:
    tbl, _ = table(store, route({"rules": [
        {"matches": [{"path": {"value": "/v1api"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/reviews"},
                                                           "hostname": "reviews.internal"}},
                     {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                         "set": [{"name": "X-Route", "value": "v1api"}], "add": [{"name": "x-add", "value": "1"}],
                         "remove": ["x-drop"]}},
                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-served", "value": "yes"}]}},
                     {"type": "RequestMirror", "requestMirror": {"backendRef": backend("reviews-v3"), "percent": 100}}],
         "backendRefs": [backend("reviews-v1", filters=[
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-backend", "value": "v1"}]}}])],
         "timeouts": {"request": "3s", "backendRequest": "1s"}},
        {"matches": [{"path": {"value": "/strip"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
         "backendRefs": [backend("reviews-v1")]},
        {"matches": [{"path": {"type": "Exact", "value": "/full"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/reviews/1"}}}],
         "backendRefs": [backend("reviews-v2")]},
    ]}))
    d = go(tbl, "/v1api/7?x=1", x_drop="gone")
    assert d.request is not None
    assert (d.request.path, d.request.authority) == ("/reviews/7?x=1", "reviews.internal")
    assert d.request.header("x-route") == "v1api" and d.request.header("x-add") == "1"
    assert d.request.header("x-backend") == "v1" and d.request.header("x-drop") is None
    assert any(op.set == (("x-served", "yes"),) for op in d.response_ops)
    assert (d.timeout, d.retries.per_try_timeout, d.retries.attempts) == (3.0, 1.0, 2)
    assert [m.cluster.hostname for m in d.mirrors] == ["reviews-v3.default.svc.cluster.local"]
    assert go(tbl, "/v1api").request.path == "/reviews"  # type: ignore[union-attr]
    assert go(tbl, "/strip/a/b").request.path == "/a/b"  # type: ignore[union-attr]
    assert go(tbl, "/strip").request.path == "/"  # type: ignore[union-attr]
    assert go(tbl, "/full?q").request.path == "/reviews/1?q"  # type: ignore[union-attr]


def test_redirect_and_a_rule_without_backends(store: Store) -> None:
    tbl, _ = table(store, route({"rules": [
        {"matches": [{"path": {"value": "/old"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {
             "scheme": "https", "hostname": "example.com", "statusCode": 301,
             "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}}}]},
        {"matches": [{"path": {"value": "/port"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {"port": 8443}}]},
        {"matches": [{"path": {"value": "/nothing"}}]},
        {"matches": [{"path": {"value": "/zero"}}], "backendRefs": [backend("reviews-v1", 0)]},
    ]}))
    d = go(tbl, "/old/x")
    assert d.local_reply is not None and d.local_reply.status == 301
    assert dict(d.local_reply.headers)["location"] == "https://example.com/new"
    d = go(tbl, "/port")
    assert d.local_reply is not None and dict(d.local_reply.headers)["location"] == "http://reviews:8443/port"
    for path in ("/nothing", "/zero"):
        d = go(tbl, path)
        assert d.local_reply is not None and d.local_reply.status == 500, path
    d = go(tbl, "/unrouted")
    assert d.local_reply is not None and d.local_reply.status == 404


def test_grpc_route_methods_become_paths(store: Store) -> None:
    grpc = route({"rules": [
        {"matches": [{"method": {"service": "bookinfo.Reviews", "method": "Get"}}], "backendRefs": [backend("reviews-v2")]},
        {"matches": [{"method": {"service": "bookinfo.Reviews"}}], "backendRefs": [backend("reviews-v3")]},
        {"matches": [{"method": {"type": "RegularExpression", "method": "List.*"}}], "backendRefs": [backend("reviews-v1", 1), backend("reviews-v2", 1)]},
        {"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}], "backendRefs": [backend("reviews-v2")]},
    ]}, kind="GRPCRoute")
    tbl, _ = table(store, grpc)
    assert to(go(tbl, "/bookinfo.Reviews/Get", "POST")) == "reviews-v2"
    assert to(go(tbl, "/bookinfo.Reviews/Put", "POST")) == "reviews-v3"
    assert to(go(tbl, "/other.Svc/Get", "POST", x_canary="1")) == "reviews-v2"
    assert {to(go(tbl, "/a.B/ListAll", "POST", seed=s)) for s in range(20)} == {"reviews-v1", "reviews-v2"}
    assert go(tbl, "/a.B/Other", "POST").local_reply.status == 404  # type: ignore[union-attr]


def test_route_on_the_waypoint_gateway_covers_its_services(store: Store) -> None:
    gw = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
    tbl, t = table(store, route({"hostnames": ["reviews.default.svc.cluster.local"],
                                 "rules": [{"backendRefs": [backend("reviews-v3")]}]}, parent=gw))
    assert to(go(tbl)) == "reviews-v3"
    assert set(tbl.virtual_services) == {HOST}
    status = route_statuses(store.snapshot())[Ref("HTTPRoute", "default", "reviews")]
    assert status["parents"][0]["conditions"][0]["reason"] == "Accepted"


def test_httproute_wins_over_a_virtual_service_for_the_same_host(store: Store) -> None:
    store.apply(load_paths([str(FIXTURES / "virtual-service-all-v1.yaml")]))
    tbl, t = table(store)
    assert to(go(tbl)) == "reviews"  # the VirtualService: subset v1 of reviews
    tbl, t = table(store, route({"rules": [{"backendRefs": [backend("reviews-v2")]}]}))
    assert to(go(tbl)) == "reviews-v2"
    assert tbl.virtual_services[HOST].name == "gateway-api~reviews"
    assert any("VirtualService default/reviews: host reviews is routed by HTTPRoute default/reviews" in p
               for p in t.problems)
    assert "VirtualService/default/reviews" not in {k for k, m in t.l7.items() if m.waypoints}
    assert tbl.virtual_services["ratings.default.svc.cluster.local"].name == "ratings"  # its other hosts stay


def conditions(store: Store, name: str = "reviews", kind: str = "HTTPRoute") -> list[dict[str, str]]:
    status = route_statuses(store.snapshot())[Ref(kind, "default", name)]
    return [{c["type"]: f"{c['status']}/{c['reason']}" for c in p["conditions"]} for p in status["parents"]]


def test_status_accepted_and_resolved(store: Store) -> None:
    table(store, route({"rules": [{"backendRefs": [backend("reviews-v1")]}]}))
    assert conditions(store) == [{"Accepted": "True/Accepted", "ResolvedRefs": "True/ResolvedRefs"}]
    status = route_statuses(store.snapshot())[Ref("HTTPRoute", "default", "reviews")]["parents"][0]
    assert status["controllerName"] == "istio.io/mesh-controller"
    assert status["parentRef"] == {"group": "", "kind": "Service", "name": "reviews", "port": 9080}
    assert status["conditions"][0]["observedGeneration"] == 1


@pytest.mark.parametrize("ref,reason", [
    (backend("nope"), "BackendNotFound"),
    ({"name": "reviews-v1", "port": 9999}, "BackendNotFound"),
    ({"group": "networking.istio.io", "kind": "ServiceEntry", "name": "x"}, "InvalidKind"),
    (backend("reviews-v1", namespace="other"), "RefNotPermitted"),
])
def test_status_unresolved_backends(store: Store, ref: dict[str, Any], reason: str) -> None:
    tbl, t = table(store, route({"rules": [{"backendRefs": [ref]}]}))
    assert conditions(store) == [{"Accepted": "True/Accepted", "ResolvedRefs": f"False/{reason}"}]
    assert go(tbl).local_reply.status == 500  # type: ignore[union-attr]
    assert any(reason in p for p in t.problems)


@pytest.mark.parametrize("parent,reason", [
    ({"group": "", "kind": "Service", "name": "ghost"}, "NoMatchingParent"),
    ({"group": "", "kind": "Service", "name": "reviews", "port": 1234}, "NoMatchingParent"),
    ({"group": "", "kind": "Service", "name": "reviews", "sectionName": "grpc"}, "NoMatchingParent"),
    ({"group": "", "kind": "Service", "name": "reviews", "namespace": "other"}, "UnsupportedValue"),
    ({"name": "waypoint", "namespace": "other"}, "NoMatchingParent"),
    ({"name": "waypoint", "sectionName": "http"}, "NoMatchingParent"),
    ({"kind": "TCPRoute", "name": "x"}, "UnsupportedValue"),
])
def test_status_parents_not_accepted(store: Store, parent: dict[str, Any], reason: str) -> None:
    tbl, t = table(store, route({"rules": [{"backendRefs": [backend("reviews-v2")]}]}, parent=parent))
    assert conditions(store)[0]["Accepted"] == f"False/{reason}"
    assert to(go(tbl)) == "reviews"  # not attached: the service's own traffic is untouched


def test_status_service_without_waypoint_and_hostnames_that_match_nothing(store: Store) -> None:
    store.label(Ref("Service", "default", "details"), {"istio.io/use-waypoint": "none"})
    table(store, route({"rules": [{"backendRefs": [backend("reviews-v2")]}]},
                       parent={"group": "", "kind": "Service", "name": "details"}))
    assert conditions(store)[0]["Accepted"] == "False/NoMatchingParent"
    table(store, route({"hostnames": ["*.example.com"], "rules": [{"backendRefs": [backend("reviews-v2")]}]},
                       name="other", parent={"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}))
    assert conditions(store, "other")[0]["Accepted"] == "False/NoMatchingListenerHostname"


def test_a_route_that_cannot_be_translated_is_left_out_alone(store: Store) -> None:
    good = route({"rules": [{"backendRefs": [backend("reviews-v2")]}]})
    store.apply(parse_text(good, "good.yaml"))
    snap = store.snapshot()
    bad = dict(snap.resources)
    bad[Ref("GRPCRoute", "default", "broken")] = {"kind": "GRPCRoute", "metadata": {"name": "broken", "namespace": "default"},
                                                  "spec": {"parentRefs": "not a list"}}

    class Snap:
        version = snap.version
        resources = bad

        def of_kind(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
            return [b for r, b in sorted(bad.items()) if r.kind == kind]

        def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            return bad.get(Ref(kind, namespace, name))

    t = translate_snapshot(Snap())
    assert any(e.startswith("GRPCRoute default/broken: cannot be translated") for e in t.errors)
    assert "VirtualService/default/gateway-api~reviews" in t.l7


def test_between_equal_matches_the_older_route_wins() -> None:
    now = [1000.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    s = Store(clock=clock)
    s.apply(load_paths([str(FIXTURES / "bookinfo-platform.yaml")]))
    s.apply(load_paths([str(FIXTURES / "waypoint.yaml")]))
    s.apply(parse_text(VERSIONS, "versions.yaml"))
    s.label(Ref("Namespace", "", "default"), {"istio.io/use-waypoint": "waypoint"})
    # "z-older" is created first: it wins over "a-newer" though its name sorts later.
    tbl, _ = table(s, route({"rules": [{"backendRefs": [backend("reviews-v3")]}]}, name="z-older"),
                   route({"rules": [{"backendRefs": [backend("reviews-v1")]}]}, name="a-newer"))
    assert to(go(tbl)) == "reviews-v3"


def test_the_apply_api_serves_the_status_a_user_reads(store: Store, tmp_path: Path) -> None:
    """`meshctl get httproute NAME -o yaml` reads this: the status is the control plane's, as of the read."""
    server = ApiServer(store, tmp_path / "api.sock")
    server.start()
    try:
        client = ApiClient(tmp_path / "api.sock", timeout=5)
        text = route({"rules": [{"backendRefs": [backend("reviews-v1")]}]})
        client.apply(parse_text(text + "status: {parents: []}\n", "r.yaml"))  # a user's status is not the word
        (body,) = client.get("httproute", "default", "reviews")
        (parent,) = body["status"]["parents"]
        assert {c["type"]: c["status"] for c in parent["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True"}
        store.delete_refs([Ref("Service", "default", "reviews-v1")])
        (body,) = client.get("httproutes", "default", "reviews")
        resolved = body["status"]["parents"][0]["conditions"][1]
        assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
        assert [b["kind"] for b in client.get("VirtualService")] == []  # other kinds untouched
    finally:
        server.stop()
