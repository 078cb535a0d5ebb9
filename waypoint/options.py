"""What a waypoint is started with: the flags every data plane process shares (`mesh.runtime`) and its
own, and what follows from them (its key, identity and discovery node)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh import defaults
from mesh.identity import SpiffeId
from mesh.runtime import ProcessOptions
from mesh.xds.node import ROLE_WAYPOINT, NodeInfo


@dataclass(frozen=True, kw_only=True)
class Options(ProcessOptions):
    name: str  # the waypoint Gateway's name
    namespace: str  # the waypoint Gateway's namespace
    node: str  # the node this waypoint runs on
    service_account: str = ""  # default: the waypoint's name
    listen: str = defaults.HBONE_LISTEN  # HBONE inbound
    drain_seconds: float = 2.0  # within the local cluster's stop grace (3 s) before SIGKILL
    allow_http_jwks: bool = False  # let RequestAuthentication fetch key sets over plain http

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account or self.name)

    def node_info(self) -> NodeInfo:
        return NodeInfo(id="", role=ROLE_WAYPOINT, node=self.node, namespace=self.namespace, name=self.name)
