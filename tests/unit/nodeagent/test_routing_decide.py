"""The outbound decision on hand-made resources: each step of a script is (who connects, to where) and
the `Route` the agent must take, before any socket exists."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from agent_resources import (
    LEGACY,
    SLEEP,
    WEB,
    WEB_KEY,
    WEB_SVC,
    WEB_VIP,
    hostname,
    identity,
    service,
    view,
    waypoint_by_service,
    workload,
)

from mesh.proto import discovery_pb2 as pb
from nodeagent.proxy.routing import Route, RouteKind, decide
from nodeagent.state import SERVICE, WORKLOAD


@dataclass(frozen=True)
class Expect:
    kind: RouteKind
    next_hop: tuple[str, int] | None
    authority: str
    expected: tuple[str, ...] = ()
    service: str = ""
    workload: str = ""

    def check(self, route: Route) -> None:
        assert route.kind is self.kind, route.reason
        assert route.next_hop == self.next_hop
        assert route.authority == self.authority
        assert [str(i) for i in route.expected] == list(self.expected)
        assert (route.service.hostname if route.service else "") == self.service
        assert (route.workload.name if route.workload else "") == self.workload


WEB_ID = str(identity("web"))
DB_VIP, LEGACY_VIP = "10.96.0.30", "10.96.0.40"
LEGACY_SVC = service("legacy", LEGACY_VIP, {5432: 5432}, [LEGACY])
MESH = view(SLEEP, *WEB, LEGACY, WEB_SVC, service("db", DB_VIP, {5432: 5432}), LEGACY_SVC)

SCRIPT: list[tuple[str, str, int, Expect]] = [
    ("pod IP in the mesh: HBONE to its node agent, the pod's address as authority",
     "10.244.2.3", 8080, Expect(RouteKind.HBONE, ("10.244.2.3", 15008), "10.244.2.3:8080", (WEB_ID,),
                                workload="web-2")),
    ("pod IP outside the mesh: plain TCP where the application was going",
     "10.244.2.9", 5432, Expect(RouteKind.PASSTHROUGH, ("10.244.2.9", 5432), "10.244.2.9:5432", workload="legacy")),
    ("service VIP whose endpoints are outside the mesh: plain TCP to one of them",
     LEGACY_VIP, 5432, Expect(RouteKind.PASSTHROUGH, ("10.244.2.9", 5432), "10.244.2.9:5432",
                              service=hostname("legacy"), workload="legacy")),
    ("address unknown to the mesh: passthrough, unchanged",
     "192.0.2.7", 443, Expect(RouteKind.PASSTHROUGH, ("192.0.2.7", 443), "192.0.2.7:443")),
    ("service without endpoints: refused",
     DB_VIP, 5432, Expect(RouteKind.REFUSE, None, f"{DB_VIP}:5432", service=hostname("db"))),
    ("service port the service does not have: refused",
     WEB_VIP, 9999, Expect(RouteKind.REFUSE, None, f"{WEB_VIP}:9999", service=hostname("web"))),
]


@pytest.mark.parametrize(("step", "dst_ip", "dst_port", "expect"), SCRIPT, ids=[s[0] for s in SCRIPT])
def test_script(step: str, dst_ip: str, dst_port: int, expect: Expect) -> None:
    expect.check(decide(MESH, SLEEP, dst_ip, dst_port, random.Random(1)))


def test_only_hbone_and_waypoint_routes_are_tunnelled() -> None:
    assert decide(MESH, SLEEP, "10.244.2.3", 8080).tunnelled
    assert not decide(MESH, SLEEP, "10.244.2.9", 5432).tunnelled
    assert not decide(MESH, SLEEP, DB_VIP, 5432).tunnelled


def test_refusals_say_why() -> None:
    assert decide(MESH, SLEEP, DB_VIP, 5432).reason == f"service {hostname('db')} has no healthy endpoint for port 5432"
    assert "for port 9999" in decide(MESH, SLEEP, WEB_VIP, 9999).reason


def test_service_vip_picks_among_endpoints_on_every_node_and_their_target_port() -> None:
    rng = random.Random(7)
    routes = [decide(MESH, SLEEP, WEB_VIP, 80, rng) for _ in range(300)]
    for r in routes:
        assert r.kind is RouteKind.HBONE and r.tunnelled and r.service == WEB_SVC
        assert r.next_hop == (r.authority.split(":")[0], 15008) and r.authority.endswith(":8080")
        assert [str(i) for i in r.expected] == [WEB_ID]
    seen = Counter(r.workload.node for r in routes if r.workload is not None)
    assert set(seen) == {"node-1", "node-2", "node-3"} and min(seen.values()) > 60


def test_unhealthy_endpoints_are_skipped_and_a_workload_port_map_wins() -> None:
    sick = workload("web-2", "10.244.2.3", node="node-2", sa="web", healthy=False, services={WEB_KEY: {80: 8080}})
    moved = workload("web-3", "10.244.3.3", node="node-3", sa="web", services={WEB_KEY: {80: 9090}})
    state = view(SLEEP, WEB[0], sick, moved, WEB_SVC)
    hops = {decide(state, SLEEP, WEB_VIP, 80, random.Random(i)).authority for i in range(50)}
    assert hops == {"10.244.1.3:8080", "10.244.3.3:9090"}


# -- waypoints -----------------------------------------------------------------------------------------

WAYPOINT = workload("waypoint-0", "10.244.2.50", node="node-2", sa="waypoint", is_waypoint=True,
                    services={f"default/{hostname('waypoint')}": {15008: 15008}})
WAYPOINT_SVC = service("waypoint", "10.96.0.99", {15008: 15008}, [WAYPOINT])
WAYPOINT_ID = str(identity("waypoint"))


def test_service_bound_to_a_waypoint_goes_to_the_waypoint_with_the_original_authority() -> None:
    bound = service("web", WEB_VIP, {80: 8080}, WEB, waypoint=waypoint_by_service("waypoint"))
    state = view(SLEEP, *WEB, WAYPOINT, WAYPOINT_SVC, bound)
    Expect(RouteKind.WAYPOINT, ("10.244.2.50", 15008), f"{WEB_VIP}:80", (WAYPOINT_ID,),
           service=hostname("web")).check(decide(state, SLEEP, WEB_VIP, 80))
    # The waypoint itself is not sent back to itself: it reaches an endpoint directly.
    assert decide(state, WAYPOINT, WEB_VIP, 80).kind is RouteKind.HBONE


def test_namespace_bound_to_a_waypoint_sends_pod_and_service_traffic_there() -> None:
    gw = waypoint_by_service("waypoint")
    web = [workload(w.name, w.addresses[0], node=w.node, sa="web", services={WEB_KEY: {80: 8080}}, waypoint=gw)
           for w in WEB]
    state = view(SLEEP, *web, WAYPOINT, WAYPOINT_SVC, service("web", WEB_VIP, {80: 8080}, web))
    Expect(RouteKind.WAYPOINT, ("10.244.2.50", 15008), "10.244.3.3:8080", (WAYPOINT_ID,),
           workload="web-3").check(decide(state, SLEEP, "10.244.3.3", 8080))
    via_vip = decide(state, SLEEP, WEB_VIP, 80, random.Random(2))
    assert via_vip.kind is RouteKind.WAYPOINT and via_vip.authority == f"{WEB_VIP}:80"
    assert via_vip.service is not None and via_vip.service.hostname == hostname("web")


def test_waypoint_at_a_fixed_address_and_port_with_its_identity() -> None:
    gw = pb.GatewayAddress(address=pb.NetworkAddress(address="10.244.9.9"), hbone_mtls_port=15009,
                           identity=WAYPOINT_ID)
    state = view(SLEEP, workload("web-1", "10.244.1.3", waypoint=gw))
    Expect(RouteKind.WAYPOINT, ("10.244.9.9", 15009), "10.244.1.3:80", (WAYPOINT_ID,),
           workload="web-1").check(decide(state, SLEEP, "10.244.1.3", 80))


def test_waypoint_without_a_ready_instance_is_refused() -> None:
    bound = service("web", WEB_VIP, {80: 8080}, WEB, waypoint=waypoint_by_service("waypoint"))
    sick = workload("waypoint-0", "10.244.2.50", node="node-2", sa="waypoint", is_waypoint=True, healthy=False)
    state = view(SLEEP, *WEB, sick, service("waypoint", "10.96.0.99", {15008: 15008}, [sick]), bound)
    route = decide(state, SLEEP, WEB_VIP, 80)
    assert route.kind is RouteKind.REFUSE and route.next_hop is None
    assert route.reason == f"waypoint of service {hostname('web')} has no ready instance"


def test_what_decide_works_out_once_follows_every_update() -> None:
    """A service port's healthy endpoints and the route to each are worked out once per state
    (`MeshState.derived`): the next update, whatever it changes, is seen by the next connection."""
    state = view(SLEEP, *WEB, WEB_SVC)
    seen = {decide(state, SLEEP, WEB_VIP, 80, random.Random(i)).next_hop for i in range(40)}
    assert seen == {("10.244.1.3", 15008), ("10.244.2.3", 15008), ("10.244.3.3", 15008)}
    again = decide(state, SLEEP, WEB_VIP, 80, random.Random(0))
    assert again is decide(state, SLEEP, WEB_VIP, 80, random.Random(0))  # the route itself, kept
    before = state.derived
    sick = workload("web-2", "10.244.2.3", node="node-2", sa="web", services={WEB_KEY: {80: 8080}}, healthy=False)
    state.apply(WORKLOAD, {sick.uid: sick}, ())  # one endpoint unhealthy: only the workload changed
    assert state.derived is not before and not state.derived
    seen = {decide(state, SLEEP, WEB_VIP, 80, random.Random(i)).next_hop for i in range(40)}
    assert seen == {("10.244.1.3", 15008), ("10.244.3.3", 15008)}
    plain = workload("web-1", "10.244.1.3", sa="web", services={WEB_KEY: {80: 8080}}, mesh=False)
    state.apply(WORKLOAD, {plain.uid: plain}, ())  # out of the mesh: plain TCP to it from now on
    routes = {decide(state, SLEEP, WEB_VIP, 80, random.Random(i)).next_hop for i in range(40)}
    assert routes == {("10.244.1.3", 8080), ("10.244.3.3", 15008)}
    state.apply(SERVICE, {f"default/{hostname('web')}": service("web", WEB_VIP, {80: 8080}, WEB[2:])}, ())
    routes = {decide(state, SLEEP, WEB_VIP, 80, random.Random(i)).next_hop for i in range(40)}
    assert routes == {("10.244.3.3", 15008)}  # the service's endpoints: web-3 alone now
    state.apply(SERVICE, {}, [f"default/{hostname('web')}"])
    assert decide(state, SLEEP, WEB_VIP, 80).kind is RouteKind.PASSTHROUGH
