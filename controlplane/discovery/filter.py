"""Which resources a discovery client may have, and in what form: "what its node needs".

The client's role, node and waypoint are those of its token (`controlplane.discovery.identity` checks
the `node` it sends against the token before this filter ever sees it).  `view(node, resources)` is
everything that client may receive of one snapshot; the rule:

- a node agent (ROLE=nodeagent) gets
  - the Workloads scheduled on its node in full (labels included: its policies select on them);
  - every other Workload trimmed to what a source agent needs to route to it and to report the
    connection: its addresses, node, tunnel protocol, service account and trust domain (the identity
    it must present), waypoint, service membership and status, and its names (uid, name, namespace,
    canonical name and revision: the latter filled in from the labels first, as the agent's metrics
    would).  Its `labels` are left out: no agent routes or authorizes on another node's labels;
  - every Service (any pod may call any service);
  - the Authorizations that apply to a workload on its node (`mesh.policy.scope`): mesh-wide ones,
    those of a namespace it has a workload in, those whose selector matches one of its workloads.
    A policy selecting a pod of another node is not its business;
  - of the L7Configs only the Telemetry ones (tracing's sampling for its pods' namespaces, which the
    agent resolves as a waypoint resolves its own); no routing or L7 policy (it does not speak HTTP).
- a waypoint (ROLE=waypoint) gets every Workload and Service in full (its upstreams and DestinationRule
  subsets, selected by labels) and only the L7Config objects that name it ("<namespace>/<name>" in
  L7Config.waypoints).
- any other client gets nothing (an authenticated stream always has one of the two roles).

The view applies to resources subscribed to by name as much as to a wildcard subscription: naming
another waypoint's L7Config, or another node's policy, does not get it.  A trimmed workload carries a
version of its own content, so a change a node cannot see (a remote pod's labels) sends it nothing.

Which Authorizations a node agent may have depends on the Workloads (a pod arriving on the node, a label
changing): `DEPENDS` says so, and the stream state compares that type in whole when the other changed.
So that an agent never holds a workload of its node without the policies that protect it, a change of
Authorizations is sent in two halves around the others (`LEADS`): new and changed policies first, the
policies that no longer apply last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from google.protobuf import any_pb2

from mesh.istiometrics import canonical_app, canonical_version
from mesh.policy.scope import applies_to
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.node import ROLE_NODEAGENT, ROLE_WAYPOINT, NodeInfo

Entry = tuple[str, any_pb2.Any]  # (version, packed resource)
View = Mapping[str, Mapping[str, Entry]]  # type_url -> name -> entry
ViewFn = Callable[[NodeInfo, View], View]

# type -> the types whose changes can change which of its resources a client may have
DEPENDS: Mapping[str, frozenset[str]] = {rs.AUTHORIZATION: frozenset({rs.WORKLOAD})}
# types whose additions go out before, and removals after, the other types' changes
LEADS: tuple[str, ...] = (rs.AUTHORIZATION,)

_MEMO_LIMIT = 65536
_TELEMETRY_PREFIX = f"{rs.L7_KIND_NAMES[pb.TELEMETRY]}/"  # the L7Configs node agents get (`rs.name_of`)


class _Memo:
    """Unpacked and trimmed resources by content version, shared by every stream (versions are content
    hashes, so an entry never goes stale; the memo is emptied when it grows past its limit)."""

    def __init__(self) -> None:
        self.workloads: dict[str, pb.Workload] = {}
        self.trimmed: dict[str, Entry] = {}
        self.policies: dict[str, pb.Authorization] = {}
        self.l7: dict[str, frozenset[str]] = {}

    def _room(self, table: dict[str, object]) -> None:
        if len(table) >= _MEMO_LIMIT:
            table.clear()

    def workload(self, version: str, packed: any_pb2.Any) -> pb.Workload:
        w = self.workloads.get(version)
        if w is None:
            w = pb.Workload()
            packed.Unpack(w)
            self._room(self.workloads)  # type: ignore[arg-type]
            self.workloads[version] = w
        return w

    def trimmed_workload(self, version: str, packed: any_pb2.Any) -> Entry:
        entry = self.trimmed.get(version)
        if entry is None:
            trimmed = remote_workload(self.workload(version, packed))
            out = rs.pack(trimmed)
            entry = (rs.version_of(out), out)
            self._room(self.trimmed)  # type: ignore[arg-type]
            self.trimmed[version] = entry
        return entry

    def policy(self, version: str, packed: any_pb2.Any) -> pb.Authorization:
        p = self.policies.get(version)
        if p is None:
            p = pb.Authorization()
            packed.Unpack(p)
            self._room(self.policies)  # type: ignore[arg-type]
            self.policies[version] = p
        return p

    def l7_waypoints(self, version: str, packed: any_pb2.Any) -> frozenset[str]:
        names = self.l7.get(version)
        if names is None:
            cfg = pb.L7Config()
            names = frozenset(cfg.waypoints) if packed.Unpack(cfg) else frozenset()
            self._room(self.l7)  # type: ignore[arg-type]
            self.l7[version] = names
        return names


_memo = _Memo()


def remote_workload(w: pb.Workload) -> pb.Workload:
    """What an agent of another node needs of workload `w` (see the module's docstring)."""
    out = pb.Workload()
    out.CopyFrom(w)
    out.canonical_name = canonical_app(w)
    out.canonical_revision = canonical_version(w)
    out.ClearField("labels")
    return out


def _node_agent_view(node: NodeInfo, resources: View) -> View:
    workloads: dict[str, Entry] = {}
    local: list[pb.Workload] = []
    for name, (version, packed) in resources.get(rs.WORKLOAD, {}).items():
        w = _memo.workload(version, packed)
        if node.node and w.node == node.node:
            workloads[name] = (version, packed)
            local.append(w)
        else:
            workloads[name] = _memo.trimmed_workload(version, packed)
    scopes = {(w.namespace, tuple(sorted(w.labels.items()))) for w in local}
    policies: dict[str, Entry] = {}
    for name, (version, packed) in resources.get(rs.AUTHORIZATION, {}).items():
        p = _memo.policy(version, packed)
        if any(applies_to(p, ns, dict(labels)) for ns, labels in scopes):
            policies[name] = (version, packed)
    telemetry = {name: entry for name, entry in resources.get(rs.L7_CONFIG, {}).items()
                 if name.startswith(_TELEMETRY_PREFIX)}
    return {rs.WORKLOAD: workloads, rs.SERVICE: resources.get(rs.SERVICE, {}), rs.AUTHORIZATION: policies,
            rs.L7_CONFIG: telemetry}


def _waypoint_view(node: NodeInfo, resources: View) -> View:
    key = node.waypoint_key
    l7 = {name: (version, packed) for name, (version, packed) in resources.get(rs.L7_CONFIG, {}).items()
          if key in _memo.l7_waypoints(version, packed)}
    return {rs.WORKLOAD: resources.get(rs.WORKLOAD, {}), rs.SERVICE: resources.get(rs.SERVICE, {}), rs.L7_CONFIG: l7}


def view(node: NodeInfo, resources: View) -> View:
    """What client `node` may have of `resources`, in the form it gets them."""
    if node.role == ROLE_NODEAGENT:
        return _node_agent_view(node, resources)
    if node.role == ROLE_WAYPOINT:
        return _waypoint_view(node, resources)
    return {}

