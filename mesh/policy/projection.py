"""What an AuthorizationPolicy or a PeerAuthentication means at L4: validated specs in, `Authorization`
messages out (pure).  The control plane projects every policy for the node agents with it, and a waypoint
projects its own policies with it for the tunnels it cannot read as HTTP.

What L4 can enforce is: source principals, namespaces and IP blocks, destination ports, and `when`
conditions on source.ip, source.namespace, source.principal, destination.ip and destination.port.
Scope: a policy with a selector applies to the selected workloads of its namespace; without one, to its
namespace, or to the whole mesh in the root namespace (`istio-system`).  Policies with `targetRef(s)`
are enforced by waypoints, so `authorization_policy()` leaves them out (None).

A rule that also needs L7 attributes (methods, paths, hosts, request principals, header or claim
conditions, remoteIpBlocks) cannot be checked at L4, so it fails closed: in an ALLOW policy the rule is
dropped (it allows nothing), in a DENY policy the L7 conditions are dropped (it denies more).  AUDIT
rules with L7 attributes are dropped.  A CUSTOM policy (external authorization, for which the mesh has
no provider) fails closed: it is projected as a DENY policy, so it denies what its rules match, and
more where its rules need L7 attributes (docs/ARCHITECTURE.md, "CUSTOM policies").  Every such decision
is reported in `problems`.

Principals and namespaces follow Istio's matching (`mesh.policy.matchers`): `*` (any non-empty value),
`prefix*`, `*suffix`, or an exact value.  Principals are kept in Istio's form `<td>/ns/<ns>/sa/<sa>`
(a `spiffe://` written by the user is removed).

A PeerAuthentication in STRICT mode becomes a DENY policy `converted_peer_authentication_<name>` that
refuses connections without a peer identity (plaintext), honouring port-level modes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.api.kinds import ROOT_NAMESPACE
from mesh.policy.matchers import cidr, principal_match, string_match
from mesh.proto import discovery_pb2 as pb

L4_WHEN = ("source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port")
_L7_SOURCE = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
_L7_OPERATION = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_ACTIONS = {"ALLOW": pb.ALLOW, "DENY": pb.DENY, "AUDIT": pb.AUDIT, "CUSTOM": pb.DENY}
PEER_AUTHN_PREFIX = "converted_peer_authentication_"


def scope_of(body: Mapping[str, Any]) -> tuple[pb.AuthorizationScope, dict[str, str]]:
    spec = body.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if spec.get("selector") is not None:
        return pb.WORKLOAD_SELECTOR, dict(selector)
    if body["metadata"]["namespace"] == ROOT_NAMESPACE:
        return pb.GLOBAL, {}
    return pb.NAMESPACE, {}


def _source_match(src: Mapping[str, Any]) -> pb.Match:
    return pb.Match(
        principals=[principal_match(v) for v in src.get("principals") or []],
        not_principals=[principal_match(v) for v in src.get("notPrincipals") or []],
        namespaces=[string_match(v) for v in src.get("namespaces") or []],
        not_namespaces=[string_match(v) for v in src.get("notNamespaces") or []],
        source_ips=[cidr(v) for v in src.get("ipBlocks") or []],
        not_source_ips=[cidr(v) for v in src.get("notIpBlocks") or []],
    )


def _operation_match(op: Mapping[str, Any]) -> pb.Match:
    return pb.Match(destination_ports=[int(p) for p in op.get("ports") or []],
                    not_destination_ports=[int(p) for p in op.get("notPorts") or []])


def _when_match(cond: Mapping[str, Any]) -> pb.Match:
    key, values, nots = cond["key"], cond.get("values") or [], cond.get("notValues") or []
    if key == "source.ip":
        return pb.Match(source_ips=[cidr(v) for v in values], not_source_ips=[cidr(v) for v in nots])
    if key == "destination.ip":
        return pb.Match(destination_ips=[cidr(v) for v in values], not_destination_ips=[cidr(v) for v in nots])
    if key == "destination.port":
        return pb.Match(destination_ports=[int(v) for v in values], not_destination_ports=[int(v) for v in nots])
    if key == "source.namespace":
        return pb.Match(namespaces=[string_match(v) for v in values], not_namespaces=[string_match(v) for v in nots])
    return pb.Match(principals=[principal_match(v) for v in values], not_principals=[principal_match(v) for v in nots])


def _has_l7(rule: Mapping[str, Any]) -> bool:
    if any(f.get("source", {}).get(k) for f in rule.get("from") or [] for k in _L7_SOURCE):
        return True
    if any(t.get("operation", {}).get(k) for t in rule.get("to") or [] for k in _L7_OPERATION):
        return True
    return any(w["key"] not in L4_WHEN for w in rule.get("when") or [])


def _rule(rule: Mapping[str, Any]) -> pb.Rule:
    """The L4 conditions of one rule: a clause for `from`, one for `to`, one per `when`."""
    out = pb.Rule()
    # An entry with no L4 condition matches any connection, and so does the clause it is in.
    sources = [_source_match(f["source"]) for f in rule.get("from") or []]
    if sources and all(m.ListFields() for m in sources):
        out.clauses.append(pb.Clause(matches=sources))
    ops = [_operation_match(t["operation"]) for t in rule.get("to") or []]
    if ops and all(m.ListFields() for m in ops):
        out.clauses.append(pb.Clause(matches=ops))
    for cond in rule.get("when") or []:
        if cond["key"] in L4_WHEN:
            out.clauses.append(pb.Clause(matches=[_when_match(cond)]))
    return out


def authorization_policy(body: Mapping[str, Any], problems: list[str]) -> pb.Authorization | None:
    """The L4 form of an AuthorizationPolicy; None when agents do not enforce it (targetRef)."""
    meta, spec = body["metadata"], body.get("spec") or {}
    where = f"AuthorizationPolicy {meta['namespace']}/{meta['name']}"
    if spec.get("targetRef") or spec.get("targetRefs"):
        return None  # a waypoint enforces it
    action = spec.get("action", "ALLOW")
    if action == "CUSTOM":
        problems.append(f"{where}: action CUSTOM has no external authorizer here; it is enforced as DENY "
                        "(fail closed)")
    scope, selector = scope_of(body)
    out = pb.Authorization(name=meta["name"], namespace=meta["namespace"], scope=scope, selector=selector,
                           action=_ACTIONS[action],
                           dry_run=(meta.get("annotations") or {}).get("istio.io/dry-run") == "true")
    for i, rule in enumerate(spec.get("rules") or []):
        if _has_l7(rule):
            if action in ("DENY", "CUSTOM"):
                problems.append(f"{where}: rules[{i}] has L7 attributes that agents cannot check; "
                                "they are ignored at L4, so it denies more (add a waypoint to enforce them)")
            else:
                problems.append(f"{where}: rules[{i}] has L7 attributes that agents cannot check; "
                                "the rule is dropped at L4 and allows nothing (add a waypoint to enforce it)")
                continue
        out.rules.append(_rule(rule))
    return out


def peer_authentication(body: Mapping[str, Any]) -> pb.Authorization | None:
    """The DENY policy a PeerAuthentication amounts to at L4; None when it requires nothing (not STRICT)."""
    meta, spec = body["metadata"], body.get("spec") or {}
    mode = (spec.get("mtls") or {}).get("mode", "UNSET")
    port_modes = {int(p): (v or {}).get("mode", "UNSET") for p, v in (spec.get("portLevelMtls") or {}).items()}
    plaintext = pb.Match(not_principals=[pb.StringMatch(presence=True)])
    if mode == "STRICT":
        exempt = sorted(p for p, m in port_modes.items() if m in ("PERMISSIVE", "DISABLE"))
        plaintext.not_destination_ports.extend(exempt)
    else:
        strict_ports = sorted(p for p, m in port_modes.items() if m == "STRICT")
        if not strict_ports:
            return None
        plaintext.destination_ports.extend(strict_ports)
    scope, selector = scope_of(body)
    return pb.Authorization(name=PEER_AUTHN_PREFIX + meta["name"], namespace=meta["namespace"], scope=scope,
                            selector=selector, action=pb.DENY,
                            rules=[pb.Rule(clauses=[pb.Clause(matches=[plaintext])])])
