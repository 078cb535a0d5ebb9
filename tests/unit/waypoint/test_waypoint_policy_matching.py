"""One meaning of a policy's sources wherever it is enforced: the node agent, the waypoint's L4 passthrough
and the waypoint's L7 authorization decide the same for the same peer (they share `mesh.policy.matchers`)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.identity import SpiffeId
from mesh.policy.evaluator import ConnectionInfo, evaluate
from mesh.policy.projection import authorization_policy
from mesh.proto import discovery_pb2 as pb
from waypoint.l7 import authz, l4authz
from waypoint.l7.authz import AuthzRequest, CompiledPolicy, compile_policy
from waypoint.l7.model import ClientInfo

HOST = "web.prod.svc.cluster.local"
URI = "spiffe://cluster.local/ns/default/sa/sleep"
SLEEP = ClientInfo(peer_identity=URI, source="10.244.1.3:40112", original_destination="10.96.0.10:8080")
ANONYMOUS = ClientInfo(peer_identity="", source="10.244.1.3:40112", original_destination="10.96.0.10:8080")
V4_MAPPED = ClientInfo(peer_identity=URI, source="[::ffff:10.244.1.3]:40112", original_destination="10.96.0.10:8080")


def compiled(spec: dict[str, Any]) -> CompiledPolicy:
    return compile_policy("AuthorizationPolicy prod/p", "p", "prod", spec, (HOST,))[0]


def at_agent(spec: dict[str, Any], client: ClientInfo) -> bool:
    msg = authorization_policy({"metadata": {"name": "p", "namespace": "prod"}, "spec": spec}, [])
    assert msg is not None
    peer = SpiffeId.parse(client.peer_identity) if client.peer_identity else None
    conn = ConnectionInfo(peer, client.source_ip, pb.Workload(), client.destination_ip, client.destination_port)
    return evaluate(conn, [msg]).allowed


def at_waypoint_l4(spec: dict[str, Any], client: ClientInfo) -> bool:
    return l4authz.decide([l4authz.to_l4(compiled(spec))], HOST, client).allowed


def at_waypoint_l7(spec: dict[str, Any], client: ClientInfo) -> bool:
    request = AuthzRequest(method="GET", path="/", host="web:8080", port=client.destination_port,
                           principal=client.principal, namespace=client.namespace, source_ip=client.source_ip,
                           destination_ip=client.destination_ip)
    return authz.decide([compiled(spec)], HOST, request).allowed


SOURCES: list[tuple[str, dict[str, Any]]] = [
    ("principal, Istio form", {"principals": ["cluster.local/ns/default/sa/sleep"]}),
    ("principal, SPIFFE form", {"principals": [URI]}),
    ("principal prefix, SPIFFE form", {"principals": ["spiffe://cluster.local/ns/default/*"]}),
    ("principal suffix", {"principals": ["*/sa/sleep"]}),
    ("principal, other", {"principals": ["spiffe://cluster.local/ns/default/sa/web"]}),
    ("any principal", {"principals": ["*"]}),
    ("notPrincipals, Istio form", {"notPrincipals": ["cluster.local/ns/default/sa/sleep"]}),
    ("notPrincipals, SPIFFE form", {"notPrincipals": [URI]}),
    ("notPrincipals, other", {"notPrincipals": ["spiffe://cluster.local/ns/default/sa/web"]}),
    ("namespaces", {"namespaces": ["default"]}),
    ("namespaces prefix", {"namespaces": ["def*"]}),
    ("notNamespaces", {"notNamespaces": ["default"]}),
    ("notNamespaces, other", {"notNamespaces": ["legacy"]}),
    ("ipBlocks CIDR", {"ipBlocks": ["10.244.1.0/24"]}),
    ("ipBlocks single IP", {"ipBlocks": ["10.244.1.3"]}),
    ("ipBlocks, other", {"ipBlocks": ["10.244.2.0/24"]}),
    ("notIpBlocks", {"notIpBlocks": ["10.244.1.3/32"]}),
    ("notIpBlocks, other", {"notIpBlocks": ["192.168.0.0/16"]}),
]
CLIENTS = [("mTLS", SLEEP), ("no identity", ANONYMOUS), ("v4-mapped source", V4_MAPPED)]


@pytest.mark.parametrize("action", ["ALLOW", "DENY"])
@pytest.mark.parametrize("client", [c[1] for c in CLIENTS], ids=[c[0] for c in CLIENTS])
@pytest.mark.parametrize("source", [s[1] for s in SOURCES], ids=[s[0] for s in SOURCES])
def test_agent_and_waypoint_agree(source: dict[str, Any], client: ClientInfo, action: str) -> None:
    spec = {"action": action, "rules": [{"from": [{"source": source}]}]}
    assert at_agent(spec, client) == at_waypoint_l4(spec, client) == at_waypoint_l7(spec, client)


@pytest.mark.parametrize("when", [
    {"key": "source.principal", "values": [URI]},
    {"key": "source.principal", "notValues": ["spiffe://cluster.local/ns/default/*"]},
    {"key": "source.namespace", "values": ["default"]},
    {"key": "source.ip", "values": ["10.244.1.3"]},
    {"key": "source.ip", "notValues": ["10.244.1.0/24"]},
    {"key": "destination.ip", "values": ["10.96.0.0/16"]},
], ids=lambda w: f"{w['key']} {next(iter(k for k in w if k != 'key'))}")
@pytest.mark.parametrize("client", [c[1] for c in CLIENTS], ids=[c[0] for c in CLIENTS])
def test_agent_and_waypoint_agree_on_when(when: dict[str, Any], client: ClientInfo) -> None:
    spec = {"action": "ALLOW", "rules": [{"when": [when]}]}
    assert at_agent(spec, client) == at_waypoint_l4(spec, client) == at_waypoint_l7(spec, client)


def test_l7_reads_spiffe_principals_like_the_agent() -> None:
    # Before the shared matcher, the waypoint's L7 check compared `spiffe://...` with the peer's identity
    # written without the scheme: a DENY never matched (fail open) and an ALLOW never did (fail closed).
    deny = {"action": "DENY", "rules": [{"from": [{"source": {"principals": [URI]}}]}]}
    assert not at_waypoint_l7(deny, SLEEP)
    allow = {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/default/*"]}}]}]}
    assert at_waypoint_l7(allow, SLEEP)
    allow_others = {"action": "ALLOW", "rules": [{"from": [{"source": {"notPrincipals": [URI]}}]}]}
    assert not at_waypoint_l7(allow_others, SLEEP)
    when = {"action": "DENY", "rules": [{"when": [{"key": "source.principal", "values": [URI]}]}]}
    assert not at_waypoint_l7(when, SLEEP)
