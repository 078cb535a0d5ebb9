"""Ingress Gateways (`gatewayClassName: istio`) through the production assembly, without sockets: the store
(validation), the control plane's translation of the routes attached to them, the gateway's compilation of
what it is sent (`waypoint.config.compile_table(ingress=True)`) and its routing decision by Host header and
listener port (`waypoint.l7.routing.decide`); and the Gateway's status."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from controlplane.translate.gatewayapi import route_statuses
from controlplane.translate.ingress import intersect
from controlplane.translate.ingressstatus import PUBLISHED_ANNOTATION, gateway_statuses
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.client import ApiClient
from mesh.api.errors import ValidationError
from mesh.api.loader import load_paths, parse_text
from mesh.api.validate import Ref
from tests.tlsfiles import server_cert
from waypoint.config import RouteTable, compile_table
from waypoint.l7.model import ClientInfo, RequestHead
from waypoint.l7.routing import RouteDecision, decide

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "istio"
GW = "default/ingress"


def gateway(listeners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "ingress", "namespace": "default"},
            "spec": {"gatewayClassName": "istio", "listeners": listeners or [
                {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com",
                 "allowedRoutes": {"namespaces": {"from": "All"}}},
                {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "shop.example.com",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": "shop-cert"}]}}]}}


def secret(name: str = "shop-cert", **extra: Any) -> dict[str, Any]:
    cert = server_cert("shop.example.com")
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(cert.chain).decode(), "tls.key": base64.b64encode(cert.key).decode()}}
    return {**body, **extra}


def route(name: str, hostnames: list[str], rules: list[dict[str, Any]], namespace: str = "default",
          parent: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [parent or {"name": "ingress", "namespace": "default"}], "hostnames": hostnames,
                     "rules": rules}}


def to(service: str, path: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"backendRefs": [{"name": service, "port": 9080}]}
    if path:
        rule["matches"] = [{"path": {"type": "PathPrefix", "value": path}}]
    return rule


def apply(store: Store, *bodies: dict[str, Any]) -> None:
    store.apply(parse_text(yaml.safe_dump_all(bodies), "ingress.yaml"))


@pytest.fixture
def store() -> Store:
    s = Store()
    s.apply(load_paths([str(FIXTURES / "bookinfo-platform.yaml")]))
    apply(s, gateway(), secret(),
          route("shop", ["shop.example.com"], [to("reviews", "/reviews"), to("productpage")]),
          route("details", [], [to("details")]))
    return s


def gateway_table(store: Store) -> RouteTable:
    t = translate_snapshot(store.snapshot())
    result = compile_table(GW, t.workloads.values(), t.services.values(), t.l7.values(), t.version, ingress=True)
    assert not result.errors, result.errors
    return result.table


def go(tbl: RouteTable, host: str, path: str = "/", port: int = 80) -> RouteDecision:
    client = ClientInfo("", "192.0.2.1:40000", f"0.0.0.0:{port}")
    return decide(tbl, RequestHead("GET", path, host, ()), client, random.Random(1))


def where(d: RouteDecision) -> str:
    if d.cluster is None:
        assert d.local_reply is not None
        return str(d.local_reply.status)
    return d.cluster.hostname.split(".")[0]


def test_routes_by_host_header_path_and_listener(store: Store) -> None:
    tbl = gateway_table(store)
    assert where(go(tbl, "shop.example.com", "/reviews/1")) == "reviews"
    assert where(go(tbl, "shop.example.com:80", "/")) == "productpage"
    assert where(go(tbl, "shop.example.com", "/reviews", port=443)) == "reviews"  # the HTTPS listener too
    # a route without hostnames takes each listener's: *.example.com on http, shop.example.com on https
    assert where(go(tbl, "other.example.com", "/x")) == "details"
    assert where(go(tbl, "other.example.com", "/x", port=443)) == "404"  # the https listener is shop's only
    assert where(go(tbl, "example.org", "/")) == "404"  # no listener has this hostname
    d = go(tbl, "shop.example.com", "/reviews/1")
    assert d.service is not None and d.service.name == "reviews"  # the metrics' destination service


def test_translation_is_one_virtual_service_per_gateway_hostname(store: Store) -> None:
    t = translate_snapshot(store.snapshot())
    ours = {k: m for k, m in t.l7.items() if GW in m.waypoints}
    assert sorted(ours) == ["VirtualService/default/gateway-api~ingress~*.example.com",
                            "VirtualService/default/gateway-api~ingress~shop.example.com"]
    # a mesh waypoint never gets them, and the mesh's own services keep their routing
    assert all(list(m.waypoints) == [GW] for m in ours.values())
    spec = ours["VirtualService/default/gateway-api~ingress~shop.example.com"].spec
    assert list(spec["gateways"]) == [GW]
    assert {m["port"] for h in spec["http"] for m in h["match"]} == {80, 443}


@pytest.mark.parametrize("listener,route_hosts,expected", [
    ("", [], ("*",)),
    ("*.example.com", [], ("*.example.com",)),
    ("", ["a.example.com"], ("a.example.com",)),
    ("*.example.com", ["a.example.com", "a.example.org"], ("a.example.com",)),
    ("shop.example.com", ["*.example.com"], ("shop.example.com",)),
    ("shop.example.com", ["other.example.com"], ()),
])
def test_hostname_intersection(listener: str, route_hosts: list[str], expected: tuple[str, ...]) -> None:
    assert intersect(listener, route_hosts) == expected


def conditions(store: Store, name: str) -> dict[str, str]:
    (parent,) = route_statuses(store.snapshot())[Ref("HTTPRoute", "default", name)]["parents"]
    return {c["type"]: f"{c['status']}/{c['reason']}" for c in parent["conditions"]}


@pytest.mark.parametrize("parent,hosts,reason", [
    ({"name": "ingress", "sectionName": "https"}, ["other.example.com"], "NoMatchingListenerHostname"),
    ({"name": "ingress", "sectionName": "nope"}, [], "NoMatchingParent"),
    ({"name": "ingress", "port": 8080}, [], "NoMatchingParent"),
    ({"name": "ingress"}, ["example.org"], "NoMatchingListenerHostname"),
    ({"name": "missing"}, [], "NoMatchingParent"),
])
def test_route_status_on_an_ingress_gateway(store: Store, parent: dict[str, Any], hosts: list[str],
                                            reason: str) -> None:
    assert conditions(store, "shop") == {"Accepted": "True/Accepted", "ResolvedRefs": "True/ResolvedRefs"}
    apply(store, route("bad", hosts, [to("reviews")], parent=parent))
    assert conditions(store, "bad")["Accepted"] == f"False/{reason}"


def test_allowed_routes_namespaces(store: Store) -> None:
    apply(store, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}},
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"ports": [{"name": "http", "port": 9080}], "selector": {"app": "web"}}},
          route("web", ["web.example.com"], [to("web")], namespace="shop"),
          route("secure", ["shop.example.com"], [to("web")], namespace="shop",
                parent={"name": "ingress", "namespace": "default", "sectionName": "https"}))
    ok = route_statuses(store.snapshot())
    assert ok[Ref("HTTPRoute", "shop", "web")]["parents"][0]["conditions"][0]["status"] == "True"  # from: All
    (refused,) = ok[Ref("HTTPRoute", "shop", "secure")]["parents"]
    assert refused["conditions"][0]["reason"] == "NotAllowedByListeners"  # https: Same (the default)
    listeners = gateway()["spec"]["listeners"]
    listeners[1]["allowedRoutes"] = {"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}}
    apply(store, gateway(listeners))
    assert route_statuses(store.snapshot())[Ref("HTTPRoute", "shop", "secure")]["parents"][0]["conditions"][0][
        "status"] == "True"


def test_gateway_status_programmed_once_a_ready_pod_is_published(store: Store) -> None:
    status = gateway_statuses(store.snapshot())[Ref("Gateway", "default", "ingress")]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Accepted": "True", "Programmed": "False"}
    assert status["addresses"] == []
    http, https = status["listeners"]
    assert (http["name"], http["attachedRoutes"], https["attachedRoutes"]) == ("http", 2, 2)
    assert {c["type"]: c["status"] for c in https["conditions"]} == {"Accepted": "True", "ResolvedRefs": "True",
                                                                     "Programmed": "False"}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "ingress", "namespace": "default",
                        "labels": {"gateway.networking.k8s.io/gateway-name": "ingress"},
                        "annotations": {PUBLISHED_ANNOTATION: "http=127.0.0.1:40080,https=127.0.0.1:40443"}},
           "spec": {"nodeName": "node1", "containers": [{"name": "gateway", "command": ["true"]}]},
           "status": {"phase": "Running", "podIP": "10.244.1.250", "conditions": [{"type": "Ready", "status": "True"}]}}
    apply(store, pod)
    status = gateway_statuses(store.snapshot())[Ref("Gateway", "default", "ingress")]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Programmed"] == "True"
    assert status["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]
    assert [li["publishedAddress"] for li in status["listeners"]] == ["127.0.0.1:40080", "127.0.0.1:40443"]
    # the gateway's own pod is a mesh proxy: never captured, not HBONE
    t = translate_snapshot(store.snapshot())
    (w,) = [w for w in t.workloads.values() if w.name == "ingress"]
    assert w.is_waypoint and w.tunnel_protocol == 0


@pytest.mark.parametrize("change,reason", [
    ({"type": "Opaque"}, "InvalidCertificateRef"),
    ({"data": {"tls.crt": base64.b64encode(b"not a certificate").decode()}}, "InvalidCertificateRef"),
    ({"data": {**secret()["data"], "tls.key": secret()["data"]["tls.key"]}}, "InvalidCertificateRef"),  # another key
])
def test_listener_certificate_problems(store: Store, change: dict[str, Any], reason: str) -> None:
    apply(store, secret(**change))
    status = gateway_statuses(store.snapshot())[Ref("Gateway", "default", "ingress")]
    resolved = next(c for c in status["listeners"][1]["conditions"] if c["type"] == "ResolvedRefs")
    assert (resolved["status"], resolved["reason"]) == ("False", reason), resolved


def test_missing_and_foreign_secrets(store: Store) -> None:
    listeners = gateway()["spec"]["listeners"]
    listeners[1]["tls"]["certificateRefs"] = [{"name": "shop-cert", "namespace": "other"}]
    apply(store, gateway(listeners))
    status = gateway_statuses(store.snapshot())[Ref("Gateway", "default", "ingress")]
    assert status["listeners"][1]["conditions"][1]["reason"] == "RefNotPermitted"
    store.delete_refs([Ref("Secret", "default", "shop-cert")])
    listeners[1]["tls"]["certificateRefs"] = [{"name": "shop-cert"}]
    apply(store, gateway(listeners))
    status = gateway_statuses(store.snapshot())[Ref("Gateway", "default", "ingress")]
    assert "does not exist" in status["listeners"][1]["conditions"][1]["message"]


@pytest.mark.parametrize("listener,path,message", [
    ({"name": "t", "port": 9000, "protocol": "TCP"}, "spec.listeners[0].protocol", "use HTTP or HTTPS"),
    ({"name": "s", "port": 443, "protocol": "HTTPS"}, "spec.listeners[0].tls.certificateRefs", "needs a certificate"),
    ({"name": "s", "port": 443, "protocol": "HTTPS", "tls": {"mode": "Passthrough", "certificateRefs": [{"name": "c"}]}},
     "spec.listeners[0].tls.mode", "terminates TLS"),
    ({"name": "s", "port": 443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "c", "kind": "ConfigMap"}]}},
     "spec.listeners[0].tls.certificateRefs[0]", "name a Secret"),
    ({"name": "h", "port": 80, "protocol": "HTTP", "tls": {"certificateRefs": [{"name": "c"}]}},
     "spec.listeners[0].tls", "must not be set"),
    ({"name": "h", "port": 80, "protocol": "HTTP", "hostname": "Shop.Example.com"}, "spec.listeners[0].hostname",
     "not a listener hostname"),
    ({"name": "h", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "Selector"}}},
     "spec.listeners[0].allowedRoutes.namespaces.selector", "is required"),
    ({"name": "h", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "Elsewhere"}}},
     "spec.listeners[0].allowedRoutes.namespaces.from", "Same"),
    ({"name": "h", "port": 80, "protocol": "HTTP", "allowedRoutes": {"kinds": [{"kind": "TCPRoute"}]}},
     "spec.listeners[0].allowedRoutes.kinds[0]", "HTTPRoute or GRPCRoute"),
    ({"name": "h", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {
        "from": "Selector", "selector": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}}},
     "spec.listeners[0].allowedRoutes.namespaces.selector.matchExpressions", "matchLabels"),
])
def test_bad_gateways_are_refused_whole(listener: dict[str, Any], path: str, message: str) -> None:
    s = Store()
    with pytest.raises(ValidationError) as caught:
        apply(s, secret(), gateway([listener]))
    text = "\n".join(caught.value.lines())
    assert f"{path}: " in text and message in text, text
    assert s.select("Secret") == []  # nothing of the batch was applied


def test_conflicting_listeners_and_bad_secrets_are_refused() -> None:
    s = Store()
    with pytest.raises(ValidationError) as caught:
        apply(s, gateway([{"name": "a", "port": 80, "protocol": "HTTP"}, {"name": "b", "port": 80, "protocol": "HTTP"},
                          {"name": "c", "port": 80, "protocol": "HTTPS", "hostname": "x.example.com",
                           "tls": {"certificateRefs": [{"name": "c"}]}}]))
    text = "\n".join(caught.value.lines())
    assert "spec.listeners[1]: listener 'b' has the port and hostname of listener 'a'" in text
    assert "spec.listeners[2].protocol: port 80 is already an HTTP listener's" in text
    with pytest.raises(ValidationError) as caught:
        apply(s, gateway([{"name": "a", "port": 443, "protocol": "HTTPS", "hostname": "a.example.com",
                           "tls": {"certificateRefs": [{"name": "a"}]}},
                          {"name": "b", "port": 443, "protocol": "HTTPS", "hostname": "b.example.com",
                           "tls": {"certificateRefs": [{"name": "b"}]}}]))
    assert "spec.listeners[1].port: port 443 has another HTTPS listener" in "\n".join(caught.value.lines())
    with pytest.raises(ValidationError) as caught:
        apply(s, secret(data={"tls.crt": "%%%", "bad/key": "QQ=="}))
    text = "\n".join(caught.value.lines())
    assert 'data["tls.crt"]: is not base64' in text and 'data["bad/key"]' in text


def test_the_apply_api_serves_the_gateway_status(store: Store, tmp_path: Path) -> None:
    """`meshctl get gateway` reads this: the status is the control plane's, as of the read."""
    server = ApiServer(store, tmp_path / "api.sock")
    server.start()
    try:
        client = ApiClient(tmp_path / "api.sock", timeout=5)
        (body,) = client.get("gateway", "default", "ingress")
        assert [li["name"] for li in body["status"]["listeners"]] == ["http", "https"]
        assert body["status"]["conditions"][0]["reason"] == "Accepted"
    finally:
        server.stop()
