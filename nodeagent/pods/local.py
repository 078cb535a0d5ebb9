"""Pods as the local cluster (or any node whose pods' namespaces have predictable paths) shows them.

The pods come from discovery (the agent's `MeshState`): HBONE workloads on this node that are not
waypoints are in the mesh.  Their network namespace (and cgroup) paths come from formats with
`{namespace}`, `{name}` and `{uid}`, such as `/run/netns/amb.<cluster>.pod.{namespace}.{name}`.
"""

from __future__ import annotations

from collections.abc import Callable

from mesh.proto import discovery_pb2 as pb
from nodeagent.pods.source import PodRef
from nodeagent.proxy.routing import workload_identity
from nodeagent.state import MeshState


def _expand(fmt: str, w: pb.Workload) -> str:
    return fmt.format(namespace=w.namespace, name=w.name, uid=w.uid) if fmt else ""


def pod_ref(w: pb.Workload, netns_format: str, cgroup_format: str = "") -> PodRef:
    return PodRef(w.uid, w.namespace, w.name, w.addresses[0] if w.addresses else "", workload_identity(w),
                  _expand(netns_format, w), _expand(cgroup_format, w))


def in_mesh(w: pb.Workload) -> bool:
    return w.tunnel_protocol == pb.HBONE and not w.is_waypoint and bool(w.addresses)


class LocalPodSource:
    def __init__(self, state: MeshState, node: str, netns_format: str, cgroup_format: str = "") -> None:
        self.state = state
        self.node = node
        self.netns_format = netns_format
        self.cgroup_format = cgroup_format

    def desired(self) -> dict[str, PodRef]:
        return {w.uid: pod_ref(w, self.netns_format, self.cgroup_format)
                for w in self.state.workloads_on(self.node) if in_mesh(w)}

    def on_node(self) -> list[PodRef]:
        return [pod_ref(w, self.netns_format, self.cgroup_format)
                for w in self.state.workloads_on(self.node) if not w.is_waypoint]

    def subscribe(self, callback: Callable[[], None]) -> None:
        def changed(kind: str) -> None:
            callback()

        self.state.on_change(changed)
