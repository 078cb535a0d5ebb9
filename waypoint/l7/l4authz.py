"""Authorization of traffic the waypoint cannot read as HTTP (the L4 passthrough): a pure decision.

A tunnel that carries no HTTP still passes the waypoint's AuthorizationPolicies, but only their L4 part
can be checked: peer principals and namespaces, source IP blocks, destination ports, and `when` on
source/destination attributes.  The projection is the one the control plane makes for node agents
(`mesh.policy.projection.authorization_policy`), and the decision is the node agents' own
(`mesh.policy.evaluator.evaluate`), so a policy means the same at L4 wherever it is enforced.  Rules
that need HTTP attributes fail closed: in an ALLOW policy such a rule allows nothing, in a DENY policy
its HTTP conditions are dropped (it denies more).  CUSTOM policies are DENY policies here, as at the
node agents (the one rule of docs/ARCHITECTURE.md): they deny what their rules' L4 conditions match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh.identity import IdentityError, SpiffeId
from mesh.policy.evaluator import ConnectionInfo, Decision, evaluate
from mesh.policy.projection import authorization_policy
from mesh.proto import discovery_pb2 as pb
from waypoint.l7.authz import CompiledPolicy
from waypoint.l7.model import ClientInfo


@dataclass(frozen=True)
class L4Policy:
    """One waypoint policy in its L4 form, with the hostnames it covers (empty: every tunnel)."""

    hostnames: tuple[str, ...]
    authorization: pb.Authorization

    def applies_to(self, hostname: str) -> bool:
        return not self.hostnames or hostname in self.hostnames


def to_l4(policy: CompiledPolicy) -> L4Policy:
    body = {"metadata": {"name": policy.name, "namespace": policy.namespace},
            "spec": {"action": policy.action, "rules": [dict(r) for r in policy.rules]}}
    projected = authorization_policy(body, [])
    assert projected is not None  # no targetRef in `body`
    return L4Policy(policy.hostnames, projected)


def decide(policies: Sequence[L4Policy], hostname: str, client: ClientInfo) -> Decision:
    """May the tunnel of `client` (addressed to a service `hostname`, or "" for a workload) pass?"""
    try:
        peer = SpiffeId.parse(client.peer_identity) if client.peer_identity else None
    except IdentityError:
        peer = None
    conn = ConnectionInfo(source_principal=peer, source_ip=client.source_ip, destination=pb.Workload(),
                          destination_ip=client.destination_ip, destination_port=client.destination_port)
    return evaluate(conn, [p.authorization for p in policies if p.applies_to(hostname)])
