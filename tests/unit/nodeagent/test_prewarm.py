"""Pre-warm: which pooled HBONE connections a newly enrolled pod gets ahead of its first connection."""

from __future__ import annotations

from agent_resources import (
    SLEEP,
    WEB,
    WEB_SVC,
    identity,
    pod_of,
    service,
    view,
    waypoint_by_service,
    workload,
)

from mesh.hbone.pool import PoolKey
from nodeagent.proxy.outbound import PREWARM_MAX, prewarm_keys

SLEEP_POD = pod_of(SLEEP)
WEB_ID = identity("web")


def key(address: str, destination: str = "web") -> PoolKey:
    return PoolKey(identity("sleep"), identity(destination), (address, 15008), SLEEP_POD.netns)


def test_one_key_per_service_of_the_pods_namespace_as_its_first_connection_would_take() -> None:
    other_ns = service("far", "10.96.0.90", {80: 80}, [workload("far-1", "10.244.3.9", ns="other")], ns="other")
    keys = prewarm_keys(view(SLEEP, *WEB, WEB_SVC, other_ns), SLEEP_POD, SLEEP)
    assert len(keys) == 1  # web (one of its endpoints); nothing for the other namespace's service
    assert keys[0] in {key(w.addresses[0]) for w in WEB}


def test_no_key_for_what_is_not_tunnelled() -> None:
    legacy = workload("legacy", "10.244.2.9", node="node-2", mesh=False)
    legacy_svc = service("legacy", "10.96.0.40", {5432: 5432}, [legacy])
    empty = service("empty", "10.96.0.41", {80: 80}, [])
    assert prewarm_keys(view(SLEEP, legacy, legacy_svc, empty), SLEEP_POD, SLEEP) == []
    # its own service: a connection to itself is not pre-warmed either
    own = service("sleep", "10.96.0.42", {80: 80}, [SLEEP])
    assert prewarm_keys(view(SLEEP, own), SLEEP_POD, SLEEP) == []


def test_a_service_with_a_waypoint_warms_the_waypoint() -> None:
    wp = workload("wp", "10.244.2.50", node="node-2", sa="wp", services={"default/wp.default.svc.cluster.local": {15008: 15008}},
                  is_waypoint=True)
    wp_svc = service("wp", "10.96.0.50", {15008: 15008}, [wp])
    web_svc = service("web", "10.96.0.20", {80: 8080}, WEB, waypoint=waypoint_by_service("wp"))
    keys = prewarm_keys(view(SLEEP, *WEB, wp, wp_svc, web_svc), SLEEP_POD, SLEEP)
    assert key("10.244.2.50", "wp") in keys
    assert not any(k.address[0].startswith("10.244.") and k.destination == WEB_ID for k in keys)


def test_at_most_prewarm_max_keys() -> None:
    many = []
    for i in range(PREWARM_MAX + 4):
        w = workload(f"s{i}", f"10.244.2.{100 + i}", node="node-2", sa=f"s{i}")
        many += [w, service(f"s{i:02d}", f"10.96.1.{i}", {80: 80}, [w])]
    keys = prewarm_keys(view(SLEEP, *many), SLEEP_POD, SLEEP)
    assert len(keys) == PREWARM_MAX
    assert keys[0] == key("10.244.2.100", "s0")  # services in hostname order
