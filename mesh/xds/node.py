"""Who a discovery client is: the `node` of its first request, built and parsed in one place.

A client describes itself in `node.metadata` (a Struct) with these keys, all strings:

    ROLE        "nodeagent" or "waypoint" (anything else: a generic client, e.g. a debugging tool)
    NODE_NAME   the node it runs on
    NAMESPACE   for a waypoint, its namespace
    NAME        for a waypoint, its Gateway name; for a node agent, usually the node name again

`node.id` is free-form but should be unique per client; by convention "<role>~<node>~<name>.<namespace>".
When metadata is missing, the id is parsed with that convention.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2

ROLE_NODEAGENT = "nodeagent"
ROLE_WAYPOINT = "waypoint"


@dataclass(frozen=True)
class NodeInfo:
    id: str
    role: str = ""
    node: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def waypoint_key(self) -> str:
        """"<namespace>/<name>", as L7Config.waypoints names waypoints."""
        return f"{self.namespace}/{self.name}"

    def to_proto(self) -> base_pb2.Node:
        node = base_pb2.Node(id=self.id or default_id(self))
        meta = {"ROLE": self.role, "NODE_NAME": self.node, "NAMESPACE": self.namespace, "NAME": self.name}
        node.metadata.update({k: v for k, v in meta.items() if v})
        node.user_agent_name = "ambient-mesh"
        return node

    @classmethod
    def from_proto(cls, node: base_pb2.Node) -> NodeInfo:
        meta = {k: v for k, v in node.metadata.items() if isinstance(v, str)}
        role, host, name, namespace = parse_id(node.id)
        return cls(
            id=node.id,
            role=meta.get("ROLE", role),
            node=meta.get("NODE_NAME", host),
            namespace=meta.get("NAMESPACE", namespace),
            name=meta.get("NAME", name),
        )


def default_id(info: NodeInfo) -> str:
    return f"{info.role or 'client'}~{info.node}~{info.name}.{info.namespace}"


def parse_id(node_id: str) -> tuple[str, str, str, str]:
    """(role, node, name, namespace) of a conventional id; all empty when it does not follow the convention."""
    parts = node_id.split("~")
    if len(parts) != 3:
        return "", "", "", ""
    role, host, rest = parts
    name, _, namespace = rest.partition(".")
    return role, host, name, namespace
