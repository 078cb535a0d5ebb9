"""Who a discovery stream belongs to: the caller's token decides, not the `node` the client sends.

Every stream is authenticated by the CA's authenticator (`ca.auth.Authenticator`: the control plane's
own JWTs in the local cluster, TokenReview on Kubernetes), one verifier for both services.  Then:

- a node token (`NodeAgent`) opens a node agent's stream for the token's node;
- a workload token (`Workload`) opens a waypoint's stream, and only for a waypoint with that identity.
  The served resources say which waypoints have which identity (`WaypointDirectory`): a waypoint pod's
  Workload (`is_waypoint`, its Gateway in the `gateway.networking.k8s.io/gateway-name` label, its service
  account) or a `GatewayAddress` naming the waypoint (what services and pods that use it carry).  Any
  other workload is refused: pods have no business on the discovery port.

`identify(principal, claimed, directory)` turns the `node` of the first request into the `NodeInfo` the
stream is served as.  The client may leave out what the token says (it is filled in) but may not
contradict it (PERMISSION_DENIED, naming both): role, node, namespace, name, or the parts of a
conventional node id (`<role>~<node>~<name>.<namespace>`).  The id shown by `proxy-status` is always
rebuilt from the authenticated facts, so a client cannot pass itself off as another there either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ca.auth import Caller, NodeAgent, Workload
from controlplane.discovery.state import ProtocolError, Resources
from mesh import defaults
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.node import ROLE_NODEAGENT, ROLE_WAYPOINT, NodeInfo, default_id, parse_id


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one stream."""

    caller: Caller

    @property
    def key(self) -> str:
        """What concurrent streams are counted by."""
        if isinstance(self.caller, NodeAgent):
            return f"node:{self.caller.node}"
        return self.caller.identity.uri

    def __str__(self) -> str:
        return str(self.caller)


@dataclass
class WaypointFacts:
    identities: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)


def waypoints_of(resources: Resources) -> dict[tuple[str, str], WaypointFacts]:
    """(namespace, Gateway name) -> the identities and nodes the served resources give that waypoint."""
    out: dict[tuple[str, str], WaypointFacts] = {}

    def address(addr: pb.GatewayAddress) -> None:
        if addr.name and addr.identity:
            out.setdefault((addr.namespace, addr.name), WaypointFacts()).identities.add(addr.identity)

    for _, packed in resources.get(rs.WORKLOAD, {}).values():
        w = pb.Workload()
        if not packed.Unpack(w):
            continue
        if w.HasField("waypoint"):
            address(w.waypoint)
        gateway = w.labels.get(GATEWAY_NAME_LABEL)
        if w.is_waypoint and gateway:
            facts = out.setdefault((w.namespace, gateway), WaypointFacts())
            td = w.trust_domain or defaults.TRUST_DOMAIN
            facts.identities.add(f"spiffe://{td}/ns/{w.namespace}/sa/{w.service_account or 'default'}")
            if w.node:
                facts.nodes.add(w.node)
    for _, packed in resources.get(rs.SERVICE, {}).values():
        s = pb.Service()
        if packed.Unpack(s) and s.HasField("waypoint"):
            address(s.waypoint)
    return out


class WaypointDirectory:
    """`waypoints_of` the resources being served, rebuilt when their version changes (any thread)."""

    def __init__(self, served: Callable[[], tuple[str, Resources]]) -> None:
        self._served = served
        self._lock = threading.Lock()
        self._version: str | None = None
        self._index: Mapping[tuple[str, str], WaypointFacts] = {}

    def get(self, namespace: str, name: str) -> WaypointFacts | None:
        with self._lock:
            version, resources = self._served()
            if version != self._version:
                self._index, self._version = waypoints_of(resources), version
            return self._index.get((namespace, name))

    def names_for(self, identity: str) -> list[tuple[str, str]]:
        self.get("", "")  # refresh
        with self._lock:
            return sorted(k for k, f in self._index.items() if identity in f.identities)


def _denied(message: str) -> ProtocolError:
    return ProtocolError(message, "PERMISSION_DENIED")


def _agree(principal: Principal, what: str, claimed: str, actual: str) -> None:
    if claimed and claimed != actual:
        raise _denied(f"the stream's token is that of {principal}, but its node says {what} {claimed!r}: "
                      "a client is who its token says it is")


def identify(principal: Principal, claimed: NodeInfo, directory: WaypointDirectory) -> NodeInfo:
    """The node the stream is served as (see the module docstring); `ProtocolError` PERMISSION_DENIED if
    the claim contradicts the token or the token's workload is not a waypoint."""
    id_role, id_node, id_name, id_namespace = parse_id(claimed.id)
    caller = principal.caller
    if isinstance(caller, NodeAgent):
        for what, got in (("role", claimed.role), ("role", id_role)):
            _agree(principal, what, got, ROLE_NODEAGENT)
        for what, got in (("node", claimed.node), ("node", id_node), ("name", claimed.name), ("name", id_name)):
            _agree(principal, what, got, caller.node)
        for what, got in (("namespace", claimed.namespace), ("namespace", id_namespace)):
            _agree(principal, what, got, "")
        agent = NodeInfo(id="", role=ROLE_NODEAGENT, node=caller.node, name=caller.node)
        return NodeInfo(id=default_id(agent), role=agent.role, node=agent.node, name=agent.name)
    assert isinstance(caller, Workload)
    identity = caller.identity
    for what, got in (("role", claimed.role), ("role", id_role)):
        _agree(principal, what, got, ROLE_WAYPOINT)
    for what, got in (("namespace", claimed.namespace), ("namespace", id_namespace)):
        _agree(principal, what, got, identity.namespace)
    name = claimed.name or id_name
    if id_name and claimed.name and id_name != claimed.name:
        raise _denied(f"the node's id names waypoint {id_name!r} and its metadata {claimed.name!r}")
    if not name:
        mine = [n for ns, n in directory.names_for(identity.uri) if ns == identity.namespace]
        if len(mine) != 1:
            raise _denied(f"{principal}: say which waypoint this is (node metadata NAME)")
        name = mine[0]
    facts = directory.get(identity.namespace, name)
    if facts is None or identity.uri not in facts.identities:
        raise _denied(f"{principal} is not a waypoint: no waypoint {identity.namespace}/{name} with that identity "
                      "is known (only node agents and waypoints may use discovery)")
    node = claimed.node or id_node
    if node and facts.nodes and node not in facts.nodes:
        raise _denied(f"waypoint {identity.namespace}/{name} runs on {', '.join(sorted(facts.nodes))}, "
                      f"not on {node!r}")
    if not facts.nodes:
        node = ""  # nothing confirms where it runs: show nothing rather than the client's word
    elif not node and len(facts.nodes) == 1:
        node = next(iter(facts.nodes))
    info = NodeInfo(id="", role=ROLE_WAYPOINT, node=node, namespace=identity.namespace, name=name)
    return NodeInfo(id=default_id(info), role=info.role, node=info.node, namespace=info.namespace, name=info.name)
