"""The outbound decision, on a view translated from the bookinfo cluster as the control plane does."""

from __future__ import annotations

import random
from collections import Counter

from nodeagent.proxy.routing import RouteKind, decide

PRODUCTPAGE_VIP, REVIEWS_VIP = "10.96.0.10", "10.96.0.12"
AMBIENT = {"Namespace//bookinfo": {"istio.io/dataplane-mode": "ambient"}}


def source(state, ns: str = "bookinfo", name: str = "sleep"):  # type: ignore[no-untyped-def]
    return next(w for w in state.workloads() if w.namespace == ns and w.name == name)


def test_service_in_the_mesh_goes_over_hbone_to_an_endpoint(mesh_state) -> None:  # type: ignore[no-untyped-def]
    state = mesh_state(labels=AMBIENT)
    route = decide(state, source(state), PRODUCTPAGE_VIP, 9080)
    assert route.kind is RouteKind.HBONE
    assert route.next_hop == ("10.244.1.2", 15008)
    assert route.authority == "10.244.1.2:9080"
    assert [str(i) for i in route.expected] == ["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"]
    assert route.service is not None and route.service.hostname == "productpage.bookinfo.svc.cluster.local"


def test_service_endpoints_are_spread(mesh_state) -> None:  # type: ignore[no-untyped-def]
    state = mesh_state(labels=AMBIENT)
    rng = random.Random(7)
    seen = Counter(decide(state, source(state), REVIEWS_VIP, 9080, rng).workload.name for _ in range(300))  # type: ignore[union-attr]
    assert set(seen) == {"reviews-v1", "reviews-v2", "reviews-v3"}
    assert min(seen.values()) > 60


def test_outside_the_mesh_is_passthrough(mesh_state) -> None:  # type: ignore[no-untyped-def]
    state = mesh_state()  # no namespace label: nothing enrolled
    route = decide(state, source(state, "legacy"), PRODUCTPAGE_VIP, 9080)
    assert route.kind is RouteKind.PASSTHROUGH and route.next_hop == ("10.244.1.2", 9080)
    assert decide(state, None, "192.0.2.1", 443).kind is RouteKind.PASSTHROUGH


def test_pod_address_in_the_mesh(mesh_state) -> None:  # type: ignore[no-untyped-def]
    state = mesh_state(labels=AMBIENT)
    route = decide(state, source(state), "10.244.2.2", 9080)
    assert route.kind is RouteKind.HBONE and route.authority == "10.244.2.2:9080"
    assert route.workload is not None and route.workload.name == "details-v1"


def test_pod_opted_out_is_passthrough(mesh_state) -> None:  # type: ignore[no-untyped-def]
    state = mesh_state(labels={**AMBIENT, "Pod/bookinfo/details-v1": {"istio.io/dataplane-mode": "none"}})
    route = decide(state, source(state), "10.96.0.11", 9080)
    assert route.kind is RouteKind.PASSTHROUGH and route.next_hop == ("10.244.2.2", 9080)


def test_service_port_that_does_not_exist_is_refused(mesh_state) -> None:  # type: ignore[no-untyped-def]
    state = mesh_state(labels=AMBIENT)
    route = decide(state, source(state), REVIEWS_VIP, 9999)
    assert route.kind is RouteKind.REFUSE and "no healthy endpoint for port 9999" in route.reason


def test_service_with_a_waypoint_goes_to_the_waypoint(mesh_state) -> None:  # type: ignore[no-untyped-def]
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "bookinfo", "labels": {"istio.io/waypoint-for": "service"}},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "waypoint-0", "namespace": "bookinfo",
                        "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
           "spec": {"nodeName": "node-2", "serviceAccountName": "waypoint", "containers": [{"name": "w", "command": ["x"]}]},
           "status": {"podIP": "10.244.2.50", "phase": "Running"}}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "waypoint", "namespace": "bookinfo"}}
    labels = {"Namespace//bookinfo": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}}
    state = mesh_state([gateway, pod, sa], labels=labels)
    route = decide(state, source(state), REVIEWS_VIP, 9080)
    assert route.kind is RouteKind.WAYPOINT
    assert route.next_hop == ("10.244.2.50", 15008)
    assert route.authority == f"{REVIEWS_VIP}:9080"
    assert [str(i) for i in route.expected] == ["spiffe://cluster.local/ns/bookinfo/sa/waypoint"]
    # The waypoint itself is not sent back to itself: it reaches the endpoint directly.
    waypoint = next(w for w in state.workloads() if w.is_waypoint)
    assert decide(state, waypoint, REVIEWS_VIP, 9080).kind is RouteKind.HBONE
