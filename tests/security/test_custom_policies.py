"""Item 9: one rule for CUSTOM AuthorizationPolicies (external authorization, for which this mesh has no
provider) at node agents and waypoints alike: they fail closed.  What a CUSTOM policy's rules match is
denied, as a DENY policy would deny it: at a waypoint each request its rules match; at a node agent (and
at the waypoint's L4 passthrough), which cannot see HTTP, each connection its rules' L4 conditions match
(the HTTP conditions dropped, so it denies more)."""

from __future__ import annotations

from typing import Any

from controlplane.config.store import Store
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.loader import parse_text
from mesh.identity import SpiffeId
from mesh.policy.evaluator import ConnectionInfo, evaluate
from mesh.proto import discovery_pb2 as pb
from tests.security.waypoint_helpers import GATEWAY, l7
from tests.unit.waypoint.waypoint_resources import bookinfo, fq
from waypoint.config import compile_table
from waypoint.l7 import authz, l4authz
from waypoint.l7.model import ClientInfo

SLEEP = SpiffeId("cluster.local", "bookinfo", "sleep")
PRODUCTPAGE = SpiffeId("cluster.local", "bookinfo", "bookinfo-productpage")
PATHS = [{"to": [{"operation": {"paths": ["/admin*"]}}]}]
FROM_SLEEP = [{"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/sleep"]}}]}]

STORE = """
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: CUSTOM
  provider: {name: ext-authz}
  rules: RULES
"""


def _agent_decides(rules: list[dict[str, Any]], peer: SpiffeId) -> bool:
    """Through the control plane's translation for agents and the agents' evaluator."""
    store = Store()
    store.apply(parse_text(STORE.replace("RULES", repr(rules)), "store.yaml"))
    policies = list(translate_snapshot(store.snapshot()).authorizations.values())
    conn = ConnectionInfo(peer, "10.244.1.7", pb.Workload(labels={"app": "reviews"}), "10.244.1.11", 9080)
    return evaluate(conn, policies).allowed


def _waypoint(rules: list[dict[str, Any]]) -> Any:
    workloads, services = bookinfo()
    custom = l7("AuthorizationPolicy", "ext", {"targetRefs": GATEWAY, "action": "CUSTOM",
                                                "provider": {"name": "ext-authz"}, "rules": rules})
    result = compile_table("bookinfo/waypoint", workloads, services, [custom])
    assert not result.errors
    return result.table


def _l7_allows(table: Any, path: str, peer: SpiffeId) -> bool:
    request = authz.AuthzRequest(method="GET", path=path, host="reviews", port=9080,
                                 principal=str(peer).removeprefix("spiffe://"), namespace=peer.namespace,
                                 source_ip="10.244.1.7", destination_ip="10.96.0.11")
    return authz.decide(table.policies, fq("reviews"), request).allowed


def _l4_allows(table: Any, peer: SpiffeId) -> bool:
    client = ClientInfo(str(peer), "10.244.1.7:40000", "10.96.0.11:9080")
    return l4authz.decide(table.l4_policies, fq("reviews"), client).allowed


def test_custom_policy_fails_closed_at_agents_and_waypoints() -> None:
    # Rules on HTTP attributes: the waypoint denies the requests they match...
    table = _waypoint(PATHS)
    assert not _l7_allows(table, "/admin/x", SLEEP) and _l7_allows(table, "/public", SLEEP)
    # ...and where HTTP cannot be seen (agent, waypoint L4), every connection the policy covers.
    assert not _l4_allows(table, SLEEP)
    assert not _agent_decides(PATHS, SLEEP), "the node agent let a CUSTOM policy's traffic through"

    # Rules on L4 attributes: the same answer everywhere.
    table = _waypoint(FROM_SLEEP)
    for peer, allowed in ((SLEEP, False), (PRODUCTPAGE, True)):
        assert _agent_decides(FROM_SLEEP, peer) is allowed, peer
        assert _l7_allows(table, "/", peer) is allowed, peer
        assert _l4_allows(table, peer) is allowed, peer
