"""L4 authorization of one connection: a pure function from facts to a decision.

The node agent's inbound path (HBONE 15008 or plaintext 15006) and the waypoint's L4 passthrough gather
what they know about a connection into a `ConnectionInfo`, take the `Authorization` policies that apply
(projected by `mesh.policy.projection`), and call `evaluate()`.  Nothing here reads sockets, clocks or the read model, so the whole policy language is
tested with plain values.

How a decision is made (the order matters):

1. Policies marked dry-run (`istio.io/dry-run: "true"`) never change the decision; they are evaluated
   a second time together with the enforced ones, and the outcome is reported as `would_allow`.
2. AUDIT policies never change the decision; the ones that match are reported in `audited`.
3. If any DENY policy matches, the connection is denied by it.
4. Otherwise, if at least one ALLOW policy applies, the connection is allowed only when one matches.
5. Otherwise it is allowed.

CUSTOM policies (external authorization) have no provider in this mesh and fail closed: the projection
hands them over as DENY policies (`mesh.policy.projection`), so they deny here what their rules match.

Matching: a policy matches when any of its rules matches, so a policy without rules matches nothing
(an ALLOW policy without rules therefore denies everything: "allow nothing"; a DENY policy without
rules denies nothing).  A rule matches when all of its clauses match (a rule without clauses matches
every connection: `rules: [{}]`).  A clause matches when any of its matches does; a clause without
matches puts no condition.  A match holds when every field it sets holds:

* principals / not_principals: compared with the peer's SPIFFE ID written without `spiffe://`
  (`cluster.local/ns/default/sa/sleep`, Istio's form); a value written with `spiffe://` is compared
  with the full URI, so both spellings work.  `presence` means "has any identity".
* namespaces / not_namespaces: the namespace of the peer's identity.
* source_ips, destination_ips (and not_*): CIDRs; a bare address means that one address.
  (These three are `mesh.policy.matchers`, which the waypoint's L7 authorization uses as well.)
* destination_ports (and not_*).

A connection without a peer identity (plaintext on 15006) fails every positive principal or namespace
condition and passes every negative one.  That is how STRICT mutual TLS is enforced: the control plane
sends a DENY policy with `not_principals: [{presence: true}]`, which matches exactly the connections
that have no identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.identity import SpiffeId
from mesh.policy.matchers import any_namespace, any_principal, ip_in
from mesh.proto import discovery_pb2 as pb

ACTION_NAMES = {pb.ALLOW: "ALLOW", pb.DENY: "DENY", pb.AUDIT: "AUDIT"}


@dataclass(frozen=True)
class ConnectionInfo:
    """What the enforcing proxy knows about a connection when it must decide.

    `source_principal` is None for a connection without a verified peer identity (plaintext 15006).
    `destination` is the destination workload (an empty `Workload` where the waypoint does not know it).
    """

    source_principal: SpiffeId | None
    source_ip: str
    destination: pb.Workload
    destination_ip: str
    destination_port: int


@dataclass(frozen=True)
class PolicyMatch:
    """A policy that matched, for the log: its `namespace/name`, its action and whether it is dry-run."""

    policy: str
    action: str
    dry_run: bool = False


@dataclass(frozen=True)
class Decision:
    """The outcome of `evaluate()`.

    `policy` is the `namespace/name` of the policy that decided (the DENY that matched, or the ALLOW
    that matched), or None when no policy decided (no policy applies, or ALLOW policies apply and none
    matched).  `reason` says why in words fit for a log line.  `would_allow` is the decision had the
    dry-run policies been enforced as well; it equals `allowed` when no dry-run policy applies.
    """

    allowed: bool
    policy: str | None
    reason: str
    audited: tuple[PolicyMatch, ...] = ()
    dry_run: tuple[PolicyMatch, ...] = ()
    would_allow: bool = True

    @property
    def denied(self) -> bool:
        return not self.allowed

    def result(self) -> str:
        """The access-log result for a denial (`401 denied by ns/name`), or "" when allowed."""
        if self.allowed:
            return ""
        return f"401 {self.reason}"


def policy_key(policy: pb.Authorization) -> str:
    return f"{policy.namespace}/{policy.name}"


# --- structure ------------------------------------------------------------------------------------------


def match_holds(m: pb.Match, conn: ConnectionInfo) -> bool:
    """True when every field `m` sets holds for `conn` (a Match that sets nothing always holds)."""
    peer = conn.source_principal
    namespace = peer.namespace if peer else None
    if m.principals and not any_principal(m.principals, peer):
        return False
    if m.not_principals and any_principal(m.not_principals, peer):
        return False
    if m.namespaces and not any_namespace(m.namespaces, namespace):
        return False
    if m.not_namespaces and any_namespace(m.not_namespaces, namespace):
        return False
    if m.source_ips and not ip_in(m.source_ips, conn.source_ip):
        return False
    if m.not_source_ips and ip_in(m.not_source_ips, conn.source_ip):
        return False
    if m.destination_ips and not ip_in(m.destination_ips, conn.destination_ip):
        return False
    if m.not_destination_ips and ip_in(m.not_destination_ips, conn.destination_ip):
        return False
    if m.destination_ports and conn.destination_port not in m.destination_ports:
        return False
    return not (m.not_destination_ports and conn.destination_port in m.not_destination_ports)


def clause_holds(clause: pb.Clause, conn: ConnectionInfo) -> bool:
    if not clause.matches:
        return True
    return any(match_holds(m, conn) for m in clause.matches)


def rule_matches(rule: pb.Rule, conn: ConnectionInfo) -> bool:
    return all(clause_holds(c, conn) for c in rule.clauses)


def policy_matches(policy: pb.Authorization, conn: ConnectionInfo) -> bool:
    """Any rule matches; a policy without rules matches nothing."""
    return any(rule_matches(r, conn) for r in policy.rules)


# --- the decision ---------------------------------------------------------------------------------------


def _decide(policies: Sequence[pb.Authorization], conn: ConnectionInfo) -> tuple[bool, str | None, str]:
    """(allowed, deciding policy, reason) over `policies` (AUDIT ones are ignored here)."""
    for p in policies:
        if p.action == pb.DENY and policy_matches(p, conn):
            return False, policy_key(p), f"denied by {policy_key(p)}"
    allows = [p for p in policies if p.action == pb.ALLOW]
    if not allows:
        return True, None, "no policy applies"
    for p in allows:
        if policy_matches(p, conn):
            return True, policy_key(p), f"allowed by {policy_key(p)}"
    names = ", ".join(policy_key(p) for p in allows)
    return False, None, f"denied: no ALLOW policy matched ({names})"


def evaluate(conn: ConnectionInfo, policies: Iterable[pb.Authorization]) -> Decision:
    """Decide whether `conn` may proceed, given the policies that apply to its destination."""
    ordered = sorted(policies, key=policy_key)
    enforced = [p for p in ordered if not p.dry_run]
    allowed, deciding, reason = _decide(enforced, conn)
    audited = tuple(
        PolicyMatch(policy_key(p), "AUDIT", p.dry_run)
        for p in ordered
        if p.action == pb.AUDIT and policy_matches(p, conn)
    )
    shadows = [p for p in ordered if p.dry_run]
    would_allow = allowed
    dry: tuple[PolicyMatch, ...] = ()
    if shadows:
        would_allow = _decide(ordered, conn)[0]
        dry = tuple(
            PolicyMatch(policy_key(p), ACTION_NAMES.get(p.action, str(p.action)), True)
            for p in shadows
            if p.action != pb.AUDIT and policy_matches(p, conn)
        )
    return Decision(allowed, deciding, reason, audited, dry, would_allow)
