"""L7 AuthorizationPolicy: compile the validated specs, then decide one request (pure).

Semantics follow Istio: CUSTOM policies are evaluated first, then DENY, then ALLOW.  A request matched by
a DENY policy is denied; when ALLOW policies apply, the request must match one of them; with none, it is
allowed.  AUDIT policies never change the outcome; matches are reported for the access log.  A policy
matches when one of its rules matches; a rule matches when every `from`, `to` and `when` holds; inside a
`from`/`to` list any entry may match; inside one source or operation every field set must hold.

`action: CUSTOM` (an external authorizer) has no provider here, so it fails closed, with the one rule node
agents follow too (docs/ARCHITECTURE.md): a CUSTOM policy denies what its rules match, as a DENY would,
and is evaluated first.  The waypoint sees HTTP, so it denies exactly the requests its rules match (the
ones Envoy would have sent to the authorizer); where HTTP is not seen (node agents, the waypoint's L4
passthrough) the rules' HTTP conditions are dropped and it denies more.  It is compiled with a warning.

`source.ip` / `ipBlocks` are the verified address of the HBONE peer; `remote.ip` / `remoteIpBlocks` are
Envoy's trusted client address (`waypoint.l7.forwarding.remote_ip`), the same unless trusted hops are set.

Values use Istio's forms: `*` (present, non-empty), `prefix*`, `*suffix`, or an exact string.  Principals,
namespaces and IP blocks (in `from` and in `when`) are matched by `mesh.policy.matchers`, the matcher the
node agents use, so a principal written `cluster.local/ns/NS/sa/SA` and one written
`spiffe://cluster.local/ns/NS/sa/SA` mean the same.  Request principals are `<iss>/<sub>`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.policy.matchers import any_namespace, any_principal, ip_in, string_matches
from waypoint.errors import ConfigError
from waypoint.l7.model import Headers, header_values

DENIED_BODY = b"RBAC: access denied"


@dataclass(frozen=True)
class AuthzRequest:
    """What a policy may look at, gathered once per request."""

    method: str
    path: str
    host: str
    port: int
    headers: Headers = ()
    principal: str = ""  # peer identity without spiffe://
    namespace: str = ""
    source_ip: str = ""
    destination_ip: str = ""
    remote_ip: str = ""  # "" means source_ip
    request_principal: str = ""  # "" when no valid JWT
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str = ""


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    namespace: str
    action: str  # ALLOW | DENY | AUDIT | CUSTOM
    rules: tuple[Mapping[str, Any], ...]
    hostnames: tuple[str, ...] = ()  # empty: every request through the waypoint

    def applies_to(self, hostname: str) -> bool:
        return not self.hostnames or hostname in self.hostnames

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    policy: str = ""  # the policy that decided (ns/name), "" for the default
    reason: str = ""
    audited: tuple[str, ...] = ()


def compile_policy(where: str, name: str, namespace: str, spec: Mapping[str, Any],
                   hostnames: Sequence[str]) -> tuple[CompiledPolicy, list[str]]:
    """The compiled policy and warnings (CUSTOM)."""
    action = spec.get("action") or "ALLOW"
    warnings = []
    if action == "CUSTOM":
        warnings.append(f"{where}: action CUSTOM (external authorization) is not supported by this waypoint; "
                        "requests its rules match are denied")
    rules = tuple(spec.get("rules") or ())
    for i, rule in enumerate(rules):
        for j, w in enumerate(rule.get("when") or ()):
            if w["key"] in ("source.ip", "remote.ip", "destination.ip"):
                for v in list(w.get("values") or ()) + list(w.get("notValues") or ()):
                    try:
                        ipaddress.ip_network(v, strict=False)
                    except ValueError as exc:
                        raise ConfigError(where, f"spec.rules[{i}].when[{j}]: {v!r} is not a CIDR") from exc
    return CompiledPolicy(name, namespace, action, rules, tuple(hostnames)), warnings


# ---- matching ---------------------------------------------------------------------------------------

def _any(patterns: Sequence[str], values: Sequence[str | None]) -> bool:
    return any(string_matches(p, v) for p in patterns for v in values)


def _principals(patterns: Sequence[str], values: Sequence[str | None]) -> bool:
    return any(any_principal(patterns, v) for v in values)


def _namespaces(patterns: Sequence[str], values: Sequence[str | None]) -> bool:
    return any(any_namespace(patterns, v) for v in values)


def _in_cidrs(blocks: Sequence[str], values: Sequence[str | None]) -> bool:
    return any(ip_in(blocks, v) for v in values)


def _field(spec: Mapping[str, Any], key: str, values: Sequence[str | None],
           match: Any = _any) -> bool:
    """`key` and `notKey` of one source/operation against the request's values."""
    pos, neg = spec.get(key), spec.get("not" + key[0].upper() + key[1:])
    if pos and not match(pos, values):
        return False
    return not (neg and match(neg, values))


def _host_match(patterns: Sequence[str], values: Sequence[str | None]) -> bool:
    def norm(h: str | None) -> str | None:
        return None if h is None else h.lower()
    hosts = [norm(v) for v in values]
    bare = [h.rsplit(":", 1)[0] if h and ":" in h and not h.endswith("]") else h for h in hosts]
    return _any([p.lower() for p in patterns], hosts + bare)


def _source(spec: Mapping[str, Any], r: AuthzRequest) -> bool:
    return (_field(spec, "principals", [r.principal] if r.principal else [], _principals)
            and _field(spec, "requestPrincipals", [r.request_principal] if r.request_principal else [])
            and _field(spec, "namespaces", [r.namespace] if r.namespace else [], _namespaces)
            and _field(spec, "ipBlocks", [r.source_ip], _in_cidrs)
            and _field(spec, "remoteIpBlocks", [r.remote_ip or r.source_ip], _in_cidrs))


def _operation(spec: Mapping[str, Any], r: AuthzRequest) -> bool:
    return (_field(spec, "methods", [r.method])
            and _field(spec, "paths", [r.path])
            and _field(spec, "hosts", [r.host], _host_match)
            and _field(spec, "ports", [str(r.port)]))


def _claim(claims: Mapping[str, Any], path: list[str]) -> list[str]:
    node: Any = claims
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    if isinstance(node, list):
        return [str(x) for x in node]
    if isinstance(node, bool):
        return ["true" if node else "false"]
    return [str(node)]


def condition_values(key: str, r: AuthzRequest) -> list[str]:
    """The request's values for a `when` key (empty when it has none)."""
    if key.startswith("request.headers["):
        return header_values(r.headers, key[len("request.headers["):-1].lower())
    if key.startswith("request.auth.claims["):
        return _claim(r.claims, key[len("request.auth.claims["):-1].split("]["))
    simple = {
        "source.principal": [r.principal], "source.namespace": [r.namespace],
        "source.ip": [r.source_ip], "remote.ip": [r.remote_ip or r.source_ip], "destination.ip": [r.destination_ip],
        "destination.port": [str(r.port)], "request.auth.principal": [r.request_principal],
        "request.auth.audiences": list(r.audiences), "request.auth.presenter": [r.presenter],
    }
    return [v for v in simple.get(key, []) if v]


# `when` keys whose values are not plain strings (the rest match with `_any`).
_WHEN_MATCHERS = {"source.ip": _in_cidrs, "remote.ip": _in_cidrs, "destination.ip": _in_cidrs,
                  "source.principal": _principals, "source.namespace": _namespaces}


def _when(spec: Mapping[str, Any], r: AuthzRequest) -> bool:
    key = spec["key"]
    return _field(spec, "values", condition_values(key, r), _WHEN_MATCHERS.get(key, _any))


def _rule(rule: Mapping[str, Any], r: AuthzRequest) -> bool:
    froms, tos, whens = rule.get("from") or (), rule.get("to") or (), rule.get("when") or ()
    return ((not froms or any(_source(f["source"], r) for f in froms))
            and (not tos or any(_operation(t["operation"], r) for t in tos))
            and all(_when(w, r) for w in whens))


def policy_matches(policy: CompiledPolicy, r: AuthzRequest) -> bool:
    return any(_rule(rule, r) for rule in policy.rules)


def decide(policies: Sequence[CompiledPolicy], hostname: str, r: AuthzRequest) -> AuthzDecision:
    mine = [p for p in policies if p.applies_to(hostname)]
    audited = tuple(p.ref for p in mine if p.action == "AUDIT" and policy_matches(p, r))
    for p in mine:
        if p.action == "CUSTOM" and policy_matches(p, r):
            return AuthzDecision(False, p.ref, "CUSTOM action is not supported: denied", audited)
    for p in mine:
        if p.action == "DENY" and policy_matches(p, r):
            return AuthzDecision(False, p.ref, "matched a DENY policy", audited)
    allows = [p for p in mine if p.action == "ALLOW"]
    if not allows:
        return AuthzDecision(True, "", "no ALLOW policy applies", audited)
    for p in allows:
        if policy_matches(p, r):
            return AuthzDecision(True, p.ref, "matched an ALLOW policy", audited)
    return AuthzDecision(False, "", "no ALLOW policy matched", audited)
