"""The pod source seam: which pods of this node should be captured, and how to reach their namespaces.

A `PodRef` is everything enrollment and the pod's proxies need of a pod.  A `PodSource` answers two
questions: which pods of the node are in the mesh now (`desired`), and which pods of the node exist at
all (`on_node`, so that capture an earlier run left in a pod that has since left the mesh is removed).
It calls back when its answer may have changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.identity import SpiffeId


@dataclass(frozen=True)
class PodRef:
    uid: str
    namespace: str
    name: str
    ip: str
    identity: SpiffeId
    netns: str  # path of the pod's network namespace
    cgroup: str = ""  # path of the pod's cgroup v2 directory, where the pod source knows it
    # the pod's own word on DNS capture (its `ambient.istio.io/dns-capture` annotation); None: the agent's default
    dns_capture: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def captures_dns(self, agent_default: bool) -> bool:
        """Whether the pod's DNS goes to the agent's DNS proxy.  The pod can opt out; it cannot opt in on an
        agent that runs no DNS proxy (`--dns-capture=false`): there would be nothing to answer its queries."""
        return agent_default and self.dns_capture is not False


class PodSource(Protocol):
    def desired(self) -> dict[str, PodRef]:
        """The pods of this node that should be captured now, by uid."""
        ...

    def on_node(self) -> list[PodRef]:
        """Every pod of this node the source knows, in the mesh or not."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) whenever `desired` may have changed."""
        ...
