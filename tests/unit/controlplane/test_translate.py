"""Translation of a bookinfo store into discovery resources (pure: no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format

from controlplane.config.store import Store
from controlplane.translate.snapshot import translate, translate_snapshot
from mesh.api.loader import load_paths, parse_text
from mesh.api.validate import Ref
from mesh.proto import discovery_pb2 as pb
from mesh.xds.resources import name_of

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "istio"
HOST = "reviews.default.svc.cluster.local"


def apply(store: Store, *names: str) -> None:
    for name in names:
        store.apply(load_paths([str(FIXTURES / name)]))


@pytest.fixture
def store() -> Store:
    s = Store()
    apply(s, "bookinfo-platform.yaml", "destination-rule-all.yaml", "waypoint.yaml", "virtual-service-all-v1.yaml",
          "authorization-policies.yaml", "authorization-policy-waypoint.yaml", "peer-authentication.yaml",
          "request-authentication.yaml")
    return s


def test_workloads(store: Store) -> None:
    t = translate_snapshot(store.snapshot())
    assert sorted(t.workloads) == ["default/details-v1", "default/productpage-v1", "default/ratings-v1",
                                   "default/reviews-v1", "default/reviews-v2", "default/reviews-v3"]
    w = t.workloads["default/reviews-v2"]
    assert (w.name, w.namespace, list(w.addresses), w.service_account, w.node) == (
        "reviews-v2", "default", ["10.244.2.11"], "bookinfo-reviews", "node-2")
    assert w.tunnel_protocol == pb.HBONE and w.status == pb.HEALTHY and not w.is_waypoint
    assert (w.canonical_name, w.canonical_revision) == ("reviews", "v2")
    assert dict(w.labels) == {"app": "reviews", "version": "v2"}
    assert list(w.services) == [f"default/{HOST}"]
    assert [(p.service_port, p.target_port) for p in w.services[f"default/{HOST}"].ports] == [(9080, 9080)]
    assert not w.HasField("waypoint")  # the waypoint is for service traffic only


def test_enrollment_by_namespace_and_pod_labels(store: Store) -> None:
    store.label(Ref("Pod", "default", "ratings-v1"), {"istio.io/dataplane-mode": "none"})
    t = translate_snapshot(store.snapshot())
    assert t.workloads["default/ratings-v1"].tunnel_protocol == pb.NONE
    store.label(Ref("Namespace", "", "default"), {}, remove=["istio.io/dataplane-mode"])
    store.label(Ref("Pod", "default", "ratings-v1"), {"istio.io/dataplane-mode": "ambient"})
    t = translate_snapshot(store.snapshot())
    assert t.workloads["default/ratings-v1"].tunnel_protocol == pb.HBONE
    assert t.workloads["default/details-v1"].tunnel_protocol == pb.NONE


def test_services(store: Store) -> None:
    t = translate_snapshot(store.snapshot())
    s = t.services[f"default/{HOST}"]
    assert (s.name, s.namespace, s.hostname, list(s.vips)) == ("reviews", "default", HOST, ["10.96.0.13"])
    assert [(p.service_port, p.target_port, p.name, p.app_protocol) for p in s.ports] == [(9080, 9080, "http", "http")]
    assert sorted(e.workload_uid for e in s.endpoints) == ["default/reviews-v1", "default/reviews-v2", "default/reviews-v3"]
    assert list(s.subject_alt_names) == ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]
    assert dict(s.selector) == {"app": "reviews"}
    assert not s.HasField("waypoint")


def test_waypoints_for_services_and_opt_out(store: Store) -> None:
    store.label(Ref("Namespace", "", "default"), {"istio.io/use-waypoint": "waypoint"})
    store.label(Ref("Service", "default", "details"), {"istio.io/use-waypoint": "none"})
    t = translate_snapshot(store.snapshot())
    wp = t.services[f"default/{HOST}"].waypoint
    assert (wp.name, wp.namespace, wp.hbone_mtls_port) == ("waypoint", "default", 15008)
    assert wp.hostname.hostname == "waypoint.default.svc.cluster.local"
    assert wp.identity == "spiffe://cluster.local/ns/default/sa/waypoint"
    assert not t.services["default/details.default.svc.cluster.local"].HasField("waypoint")
    assert not t.workloads["default/reviews-v1"].HasField("waypoint")
    assert t.l7["VirtualService/default/reviews"].waypoints == ["default/waypoint"]


def test_waypoint_for_workloads_reached_by_pod_address(store: Store) -> None:
    store.apply(parse_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wl\n  labels: {istio.io/waypoint-for: all}\n"
        "spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: wl-0\n  labels: {gateway.networking.k8s.io/gateway-name: wl}\n"
        "spec: {nodeName: node-1, serviceAccountName: wl, containers: [{name: proxy}]}\nstatus: {podIP: 10.244.1.99}\n", "w.yaml"))
    store.label(Ref("Pod", "default", "ratings-v1"), {"istio.io/use-waypoint": "wl"})
    t = translate_snapshot(store.snapshot())
    wp = t.workloads["default/ratings-v1"].waypoint
    assert wp.address.address == "10.244.1.99" and wp.identity == "spiffe://cluster.local/ns/default/sa/wl"
    proxy = t.workloads["default/wl-0"]
    assert proxy.is_waypoint and proxy.tunnel_protocol == pb.HBONE and not proxy.HasField("waypoint")


def test_missing_waypoint_is_a_problem_not_a_crash(store: Store) -> None:
    store.label(Ref("Service", "default", "ratings"), {"istio.io/use-waypoint": "ghost"})
    t = translate_snapshot(store.snapshot())
    assert not t.services["default/ratings.default.svc.cluster.local"].HasField("waypoint")
    assert "Service default/ratings uses waypoint default/ghost, which does not exist: no waypoint for it" in t.problems


def test_l4_authorization(store: Store) -> None:
    t = translate_snapshot(store.snapshot())
    assert sorted(t.authorizations) == [
        "default/allow-nothing", "default/converted_peer_authentication_ratings-ports", "default/deny-post-reviews",
        "default/details-viewer", "default/ratings-l4",
        "istio-system/audit-everything", "istio-system/converted_peer_authentication_default"]
    nothing = t.authorizations["default/allow-nothing"]
    assert (nothing.scope, nothing.action, len(nothing.rules)) == (pb.NAMESPACE, pb.ALLOW, 0)
    # productpage-viewer targets the waypoint (applied last), so agents do not get it.
    viewer = t.authorizations["default/details-viewer"]
    assert viewer.scope == pb.WORKLOAD_SELECTOR and dict(viewer.selector) == {"app": "details"}
    assert len(viewer.rules) == 0  # methods are L7: the ALLOW rule is dropped, failing closed
    assert any("details-viewer: rules[0] has L7 attributes" in p for p in t.problems)
    ratings = t.authorizations["default/ratings-l4"]
    assert json_format.MessageToDict(ratings.rules[0]) == {"clauses": [
        {"matches": [{"principals": [{"exact": "cluster.local/ns/default/sa/bookinfo-reviews"}],
                      "namespaces": [{"exact": "default"}], "sourceIps": ["10.244.0.0/16"]}]},
        {"matches": [{"destinationPorts": [9080]}]},
        {"matches": [{"notSourceIps": ["10.244.9.0/24"]}]}]}
    deny = t.authorizations["default/deny-post-reviews"]
    assert deny.action == pb.DENY and len(deny.rules) == 1 and len(deny.rules[0].clauses) == 0  # denies more
    audit = t.authorizations["istio-system/audit-everything"]
    assert (audit.scope, audit.action) == (pb.GLOBAL, pb.AUDIT)
    strict = t.authorizations["istio-system/converted_peer_authentication_default"]
    assert strict.scope == pb.GLOBAL and strict.action == pb.DENY
    assert json_format.MessageToDict(strict.rules[0]) == {"clauses": [{"matches": [{"notPrincipals": [{"presence": True}]}]}]}
    ports = t.authorizations["default/converted_peer_authentication_ratings-ports"]
    assert list(ports.rules[0].clauses[0].matches[0].not_destination_ports) == [8080]


def test_l7_config_for_waypoints(store: Store) -> None:
    store.label(Ref("Namespace", "", "default"), {"istio.io/use-waypoint": "waypoint"})
    t = translate_snapshot(store.snapshot())
    vs = t.l7["VirtualService/default/reviews"]
    assert vs.kind == pb.VIRTUAL_SERVICE and list(vs.hostnames) == [HOST]
    assert vs.api_version == "networking.istio.io/v1"
    assert json_format.MessageToDict(vs.spec)["http"][0]["route"][0]["destination"] == {"host": "reviews", "subset": "v1"}
    dr = t.l7["DestinationRule/default/reviews"]
    assert [s["name"] for s in json_format.MessageToDict(dr.spec)["subsets"]] == ["v1", "v2", "v3"]
    ap = t.l7["AuthorizationPolicy/default/productpage-viewer"]
    assert ap.waypoints == ["default/waypoint"] and list(ap.hostnames) == ["productpage.default.svc.cluster.local"]
    assert t.l7["AuthorizationPolicy/default/waypoint-jwt"].waypoints == ["default/waypoint"]
    ra = t.l7["RequestAuthentication/default/productpage-jwt"]
    assert ra.kind == pb.REQUEST_AUTHENTICATION and ra.waypoints == ["default/waypoint"]
    assert "RequestAuthentication/istio-system/jwt-example" not in t.l7
    assert any("jwt-example: without targetRefs" in p for p in t.problems)


def test_translate_is_pure_and_names_match_xds(store: Store) -> None:
    snap = store.snapshot()
    first, second = translate(snap), translate(snap)
    assert [m.SerializeToString(deterministic=True) for m in first] == [m.SerializeToString(deterministic=True) for m in second]
    t = translate_snapshot(snap)
    for table in (t.workloads, t.services, t.authorizations):
        assert all(name_of(m) == key for key, m in table.items())
    assert all(name_of(m) == key for key, m in t.l7.items())
    assert len(first) == len(t.workloads) + len(t.services) + len(t.authorizations) + len(t.l7)


def test_named_target_port_resolves_per_pod() -> None:
    s = Store()
    s.apply(parse_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n"
        "  ports: [{name: http, port: 80, targetPort: web-http}]\n  clusterIP: 10.96.0.50\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, labels: {app: web}}\n"
        "spec: {containers: [{name: c, ports: [{containerPort: 8080, name: web-http}]}]}\nstatus: {podIP: 10.244.1.2}\n", "w"))
    t = translate_snapshot(s.snapshot())
    assert t.services["default/web.default.svc.cluster.local"].ports[0].target_port == 8080
    ports = t.workloads["default/web-0"].services["default/web.default.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 8080)]
