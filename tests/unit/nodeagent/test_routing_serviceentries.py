"""The outbound decision for ServiceEntry hosts, on the state the agent gets from the translation:
external endpoints in plain TCP from the source's agent, names resolved at connect time, passthrough
for resolution NONE, the waypoint an entry uses, and `exportTo`."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from nodeagent.proxy.routing import RouteKind, decide
from nodeagent.state import MeshState


def entry(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "bookinfo", "labels": spec.pop("labels", {})}, "spec": spec}


WAYPOINT = [
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
     "metadata": {"name": "egress", "namespace": "bookinfo"},
     "spec": {"gatewayClassName": "istio-waypoint",
              "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
]
ENTRIES = [
    entry("static", hosts=["static.example.com"], addresses=["203.0.113.5"], location="MESH_EXTERNAL",
          ports=[{"number": 443, "name": "tls", "targetPort": 8443}], resolution="STATIC",
          endpoints=[{"address": "198.51.100.7"}]),
    entry("dns", hosts=["api.example.com"], ports=[{"number": 443, "name": "tls"}], resolution="DNS"),
    entry("none", hosts=["pass.example.com"], addresses=["203.0.113.9"], ports=[{"number": 80, "name": "http"}],
          resolution="NONE"),
    entry("private", hosts=["private.example.com"], addresses=["203.0.113.6"], exportTo=["."],
          ports=[{"number": 80, "name": "http"}], resolution="STATIC", endpoints=[{"address": "198.51.100.8"}]),
    entry("egress", hosts=["egress.example.com"], addresses=["203.0.113.7"], labels={"istio.io/use-waypoint": "egress"},
          ports=[{"number": 80, "name": "http"}], resolution="STATIC", endpoints=[{"address": "198.51.100.9"}]),
]


@pytest.fixture
def state(mesh_state: Callable[..., MeshState]) -> MeshState:
    return mesh_state([*WAYPOINT, *ENTRIES])


def vip(state: MeshState, host: str) -> str:
    return next(s.vips[0] for s in state.services() if s.hostname == host)


def test_static_external_endpoint_is_plain_tcp_to_its_address(state: MeshState) -> None:
    source = state.workload("bookinfo/productpage-v1")
    route = decide(state, source, "203.0.113.5", 443, random.Random(1))
    assert (route.kind, route.next_hop, route.tunnelled) == (RouteKind.PASSTHROUGH, ("198.51.100.7", 8443), False)
    assert route.service is not None and route.service.hostname == "static.example.com"


def test_dns_endpoint_is_resolved_when_connecting(state: MeshState) -> None:
    source = state.workload("bookinfo/productpage-v1")
    route = decide(state, source, vip(state, "api.example.com"), 443)
    assert (route.kind, route.next_hop, route.resolve, route.resolve_port) == (
        RouteKind.PASSTHROUGH, None, "api.example.com", 443)
    assert route.authority == "api.example.com:443"


def test_resolution_none_goes_where_the_application_sent_it(state: MeshState) -> None:
    route = decide(state, state.workload("bookinfo/productpage-v1"), "203.0.113.9", 80)
    assert (route.kind, route.next_hop) == (RouteKind.PASSTHROUGH, ("203.0.113.9", 80))
    assert route.service is not None and route.service.hostname == "pass.example.com"


def test_an_entry_not_exported_to_the_source_is_unknown_to_it(state: MeshState) -> None:
    inside = decide(state, state.workload("bookinfo/productpage-v1"), "203.0.113.6", 80)
    assert (inside.kind, inside.next_hop) == (RouteKind.PASSTHROUGH, ("198.51.100.8", 80))
    outside = decide(state, state.workload("legacy/sleep"), "203.0.113.6", 80)
    assert (outside.kind, outside.next_hop, outside.service) == (RouteKind.PASSTHROUGH, ("203.0.113.6", 80), None)


def test_an_entry_with_a_waypoint_goes_through_it(state: MeshState) -> None:
    route = decide(state, state.workload("bookinfo/productpage-v1"), "203.0.113.7", 80)
    assert route.kind is RouteKind.REFUSE  # the waypoint has no instance in this cluster: refused, not bypassed
    assert "waypoint" in route.reason
