"""Which resources a discovery client may have: "what its node needs".

The client's role, node and waypoint are those of its token (`controlplane.discovery.identity` checks
the `node` it sends against the token before this filter ever sees it).  The rule:

- a node agent (ROLE=nodeagent) gets every Workload, Service and Authorization.  It needs every
  workload and service to route and to check destination identities (a pod may talk to any other pod),
  and every L4 policy whose scope can reach its pods; it never gets L7Config (it does not speak HTTP).
- a waypoint (ROLE=waypoint) gets every Workload and Service (its upstreams and DestinationRule subsets)
  and only the L7Config objects that name it ("<namespace>/<name>" in L7Config.waypoints).
- any other client gets nothing (an authenticated stream always has one of the two roles).

The filter applies to resources subscribed to by name as much as to a wildcard subscription: naming
another waypoint's L7Config does not get it.  Narrowing a node agent to the policies that select its own
pods is a later refinement.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.node import ROLE_NODEAGENT, ROLE_WAYPOINT, NodeInfo

_NODEAGENT_TYPES = frozenset({rs.WORKLOAD, rs.SERVICE, rs.AUTHORIZATION})
_WAYPOINT_TYPES = frozenset({rs.WORKLOAD, rs.SERVICE})


def wants(node: NodeInfo, type_url: str, resource: any_pb2.Any) -> bool:
    """True if a wildcard subscriber `node` should receive this resource."""
    if node.role == ROLE_NODEAGENT:
        return type_url in _NODEAGENT_TYPES
    if node.role == ROLE_WAYPOINT:
        if type_url == rs.L7_CONFIG:
            cfg = pb.L7Config()
            return resource.Unpack(cfg) and node.waypoint_key in cfg.waypoints
        return type_url in _WAYPOINT_TYPES
    return False
