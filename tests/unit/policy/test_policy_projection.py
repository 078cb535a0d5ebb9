"""The projection of hand-written AuthorizationPolicy and PeerAuthentication specs to L4 rules, and what
the evaluator then decides with them: a policy as a user writes it, a connection as a proxy sees it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import json_format

from mesh.identity import SpiffeId
from mesh.policy.evaluator import ConnectionInfo, evaluate
from mesh.policy.projection import PEER_AUTHN_PREFIX, authorization_policy, peer_authentication, scope_of
from mesh.proto import discovery_pb2 as pb

CONN = ConnectionInfo(source_principal=SpiffeId("cluster.local", "default", "sleep"), source_ip="10.244.1.3",
                      destination=pb.Workload(uid="prod/web-1", namespace="prod"), destination_ip="10.244.2.5",
                      destination_port=8080)
PLAIN = replace(CONN, source_principal=None)


def ap(spec: dict[str, Any], name: str = "p", namespace: str = "prod", **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, **meta}, "spec": spec}


def project(spec: dict[str, Any], **kw: Any) -> tuple[pb.Authorization, list[str]]:
    problems: list[str] = []
    msg = authorization_policy(ap(spec, **kw), problems)
    assert msg is not None
    return msg, problems


def allows(spec: dict[str, Any], conn: ConnectionInfo = CONN) -> bool:
    return evaluate(conn, [project(spec)[0]]).allowed


# --- what the projection writes ----------------------------------------------------------------------------

def test_sources_operations_and_conditions_become_clauses() -> None:
    msg, problems = project({"action": "ALLOW", "rules": [{
        "from": [{"source": {"principals": ["spiffe://cluster.local/ns/default/sa/sleep"], "namespaces": ["def*"],
                             "ipBlocks": ["10.244.1.77/24"], "notIpBlocks": ["10.244.1.9"]}},
                 {"source": {"notPrincipals": ["*/sa/legacy"], "notNamespaces": ["legacy"]}}],
        "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"]}}],
        "when": [{"key": "destination.ip", "values": ["10.244.2.0/24"]},
                 {"key": "source.principal", "notValues": ["spiffe://cluster.local/ns/x/sa/*"]}],
    }]})
    assert problems == []
    assert (msg.name, msg.namespace, msg.action, msg.scope, msg.dry_run) == ("p", "prod", pb.ALLOW, pb.NAMESPACE, False)
    assert json_format.MessageToDict(msg.rules[0]) == {"clauses": [
        {"matches": [{"principals": [{"exact": "cluster.local/ns/default/sa/sleep"}],
                      "namespaces": [{"prefix": "def"}],
                      "sourceIps": ["10.244.1.0/24"], "notSourceIps": ["10.244.1.9/32"]},
                     {"notPrincipals": [{"suffix": "/sa/legacy"}], "notNamespaces": [{"exact": "legacy"}]}]},
        {"matches": [{"destinationPorts": [8080], "notDestinationPorts": [9090]}]},
        {"matches": [{"destinationIps": ["10.244.2.0/24"]}]},
        {"matches": [{"notPrincipals": [{"prefix": "cluster.local/ns/x/sa/"}]}]}]}


def test_scope_action_and_dry_run() -> None:
    assert scope_of(ap({})) == (pb.NAMESPACE, {})
    assert scope_of(ap({}, namespace="istio-system")) == (pb.GLOBAL, {})
    assert scope_of(ap({"selector": {"matchLabels": {"app": "web"}}})) == (pb.WORKLOAD_SELECTOR, {"app": "web"})
    assert project({"action": "AUDIT", "rules": [{}]})[0].action == pb.AUDIT
    assert project({"action": "DENY"})[0].action == pb.DENY
    assert project({}, annotations={"istio.io/dry-run": "true"})[0].dry_run


def test_waypoint_policies_are_not_projected_and_custom_ones_fail_closed() -> None:
    problems: list[str] = []
    assert authorization_policy(ap({"targetRefs": [{"kind": "Service", "name": "web"}], "rules": [{}]}), problems) is None
    assert problems == []
    # CUSTOM (no external authorizer here) is enforced as DENY; it used to be skipped, which failed open.
    custom = authorization_policy(ap({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]}), problems)
    assert custom is not None and custom.action == pb.DENY and len(custom.rules) == 1
    assert problems == ["AuthorizationPolicy prod/p: action CUSTOM has no external authorizer here; it is enforced "
                        "as DENY (fail closed)"]


def test_l7_attributes_fail_closed() -> None:
    allow, problems = project({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}, {"from": [{"source": {
        "namespaces": ["default"]}}]}]})
    assert len(allow.rules) == 1 and "rules[0] has L7 attributes" in problems[0] and "allows nothing" in problems[0]
    deny, problems = project({"action": "DENY", "rules": [{
        "from": [{"source": {"namespaces": ["default"], "requestPrincipals": ["*"]}}],
        "to": [{"operation": {"ports": ["8080"], "paths": ["/admin"]}}],
        "when": [{"key": "request.headers[x-user]", "values": ["bob"]}]}]})
    assert "denies more" in problems[0]
    # Only the L4 parts are kept: the rule denies every connection from `default` to port 8080.
    assert json_format.MessageToDict(deny.rules[0]) == {"clauses": [
        {"matches": [{"namespaces": [{"exact": "default"}]}]}, {"matches": [{"destinationPorts": [8080]}]}]}
    audit, problems = project({"action": "AUDIT", "rules": [{"to": [{"operation": {"hosts": ["x"]}}]}]})
    assert len(audit.rules) == 0 and problems


def test_bad_cidr_is_refused() -> None:
    with pytest.raises(ValueError):
        authorization_policy(ap({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]}), [])


# --- what the evaluator decides with a projected policy ------------------------------------------------------

SPEC_CASES = [
    # (id, spec, connection, allowed)
    ("allow nothing (no rules)", {}, CONN, False),
    ("allow all (rules: [{}])", {"rules": [{}]}, CONN, True),
    ("principal, Istio form", {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]},
     CONN, True),
    ("principal, SPIFFE form", {"rules": [{"from": [{"source": {
        "principals": ["spiffe://cluster.local/ns/default/sa/sleep"]}}]}]}, CONN, True),
    ("principal, other", {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/web"]}}]}]},
     CONN, False),
    ("principal wildcard", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}, CONN, True),
    ("principal wildcard, plaintext", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}, PLAIN, False),
    ("notPrincipals, SPIFFE form, hit", {"rules": [{"from": [{"source": {
        "notPrincipals": ["spiffe://cluster.local/ns/default/*"]}}]}]}, CONN, False),
    ("notPrincipals, miss", {"rules": [{"from": [{"source": {"notPrincipals": ["*/sa/web"]}}]}]}, CONN, True),
    ("notPrincipals, plaintext", {"rules": [{"from": [{"source": {"notPrincipals": ["*/sa/web"]}}]}]}, PLAIN, True),
    ("namespaces", {"rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]}, CONN, True),
    ("notNamespaces hit", {"rules": [{"from": [{"source": {"notNamespaces": ["def*"]}}]}]}, CONN, False),
    ("notNamespaces, plaintext", {"rules": [{"from": [{"source": {"notNamespaces": ["default"]}}]}]}, PLAIN, True),
    ("ipBlocks CIDR", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]}, PLAIN, True),
    ("ipBlocks single IP", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.3"]}}]}]}, CONN, True),
    ("ipBlocks single IP, other", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.4"]}}]}]}, CONN, False),
    ("notIpBlocks hit", {"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]}]}, CONN, False),
    ("from entries are OR", {"rules": [{"from": [{"source": {"namespaces": ["prod"]}},
                                                 {"source": {"ipBlocks": ["10.244.1.3"]}}]}]}, CONN, True),
    ("source fields are AND", {"rules": [{"from": [{"source": {"namespaces": ["default"],
                                                               "ipBlocks": ["192.168.0.0/16"]}}]}]}, CONN, False),
    ("ports", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}, CONN, True),
    ("notPorts", {"rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}, CONN, False),
    ("from and to are AND", {"rules": [{"from": [{"source": {"namespaces": ["default"]}}],
                                        "to": [{"operation": {"ports": ["9090"]}}]}]}, CONN, False),
    ("when source.namespace", {"rules": [{"when": [{"key": "source.namespace", "values": ["default"]}]}]}, CONN, True),
    ("when destination.port notValues", {"rules": [{"when": [{"key": "destination.port", "notValues": ["8080"]}]}]},
     CONN, False),
    ("when source.principal SPIFFE form", {"rules": [{"when": [{
        "key": "source.principal", "values": ["spiffe://cluster.local/ns/default/sa/sleep"]}]}]}, CONN, True),
    ("rules are OR", {"rules": [{"from": [{"source": {"namespaces": ["prod"]}}]}, {"to": [{"operation": {
        "ports": ["8080"]}}]}]}, CONN, True),
    ("an L7-only ALLOW rule allows nothing", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}, CONN, False),
]


@pytest.mark.parametrize(("spec", "conn", "expected"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_allow_policy_written_by_hand(spec: dict[str, Any], conn: ConnectionInfo, expected: bool) -> None:
    assert allows({"action": "ALLOW", **spec}, conn) is expected


def test_deny_audit_and_allow_together() -> None:
    deny = project({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["default"]}}]}]},
                   name="deny-others")[0]
    allow = project({"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}, name="web")[0]
    audit = project({"action": "AUDIT", "rules": [{}]}, name="audit", namespace="istio-system")[0]
    d = evaluate(CONN, [deny, allow, audit])
    assert (d.allowed, d.policy, d.reason) == (True, "prod/web", "allowed by prod/web")
    assert [a.policy for a in d.audited] == ["istio-system/audit"]
    d = evaluate(PLAIN, [deny, allow, audit])  # no identity: not in `default`, so the DENY matches
    assert (d.allowed, d.policy) == (False, "prod/deny-others")
    d = evaluate(replace(CONN, destination_port=9090), [deny, allow])
    assert (d.allowed, d.policy) == (False, None) and d.reason == "denied: no ALLOW policy matched (prod/web)"


# --- PeerAuthentication ---------------------------------------------------------------------------------------

def pa(mode: str | None, ports: dict[int, str] | None = None) -> pb.Authorization | None:
    spec: dict[str, Any] = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if ports:
        spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
    return peer_authentication(ap(spec, name="default"))


def test_peer_authentication_strict_refuses_plaintext_only() -> None:
    strict = pa("STRICT")
    assert strict is not None and strict.name == PEER_AUTHN_PREFIX + "default" and strict.action == pb.DENY
    assert evaluate(CONN, [strict]).allowed
    assert evaluate(PLAIN, [strict]).policy == "prod/converted_peer_authentication_default"


def test_peer_authentication_port_levels() -> None:
    assert pa("PERMISSIVE") is None and pa(None) is None and pa("DISABLE") is None
    exempt = pa("STRICT", {8080: "PERMISSIVE"})
    assert exempt is not None
    assert evaluate(PLAIN, [exempt]).allowed and not evaluate(replace(PLAIN, destination_port=9090), [exempt]).allowed
    only = pa("PERMISSIVE", {9090: "STRICT"})
    assert only is not None
    assert evaluate(PLAIN, [only]).allowed and not evaluate(replace(PLAIN, destination_port=9090), [only]).allowed
    assert evaluate(replace(CONN, destination_port=9090), [only]).allowed
