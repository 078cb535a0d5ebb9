"""What a waypoint is started with: the flags every data plane process shares (`mesh.runtime`) and its
own, and what follows from them (its key, identity and discovery node)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh import defaults
from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.identity import SpiffeId
from mesh.runtime import ProcessOptions
from mesh.xds.node import ROLE_WAYPOINT, NodeInfo
from waypoint.gateway import ListenerSpec

MAX_STREAMS = 65_536  # the most --hbone-max-streams may be


@dataclass(frozen=True, kw_only=True)
class Options(ProcessOptions):
    name: str  # the waypoint Gateway's name
    namespace: str  # the waypoint Gateway's namespace
    node: str  # the node this waypoint runs on
    service_account: str = ""  # default: the waypoint's name
    listen: str = defaults.HBONE_LISTEN  # HBONE inbound
    drain_seconds: float = 2.0  # within the local cluster's stop grace (3 s) before SIGKILL
    allow_http_jwks: bool = False  # let RequestAuthentication fetch key sets over plain http
    # the caps of the HBONE listener (15008), as a node agent has them for each pod's
    hbone_max_connections: int = defaults.HBONE_MAX_CONNECTIONS  # open at once; more are closed when accepted
    hbone_max_handshakes: int = defaults.HBONE_MAX_HANDSHAKES  # TLS handshakes at once; more wait their turn
    hbone_max_streams: int = HboneConfig.max_concurrent_streams  # tunnels one client connection may have open
    # gateway mode (an ingress Gateway's pod): its listeners (`waypoint.gateway.parse_listener`); no HBONE inbound
    listeners: tuple[ListenerSpec, ...] = ()

    def __post_init__(self) -> None:
        for flag, value in (("--hbone-max-connections", self.hbone_max_connections),
                            ("--hbone-max-handshakes", self.hbone_max_handshakes),
                            ("--hbone-max-streams", self.hbone_max_streams)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a whole number of at least 1, not {value!r}")
        if self.hbone_max_streams > MAX_STREAMS:
            raise ValueError(f"--hbone-max-streams must be at most {MAX_STREAMS} (HTTP/2 allows 2^31-1; more than "
                             f"this is no cap), not {self.hbone_max_streams}")

    @property
    def ingress(self) -> bool:
        return bool(self.listeners)

    @property
    def hbone_limits(self) -> ListenerLimits:
        return ListenerLimits(self.hbone_max_connections, self.hbone_max_handshakes)

    @property
    def hbone_config(self) -> HboneConfig:
        """The inbound HBONE settings: the defaults, with this waypoint's cap on streams per connection."""
        return HboneConfig(max_concurrent_streams=self.hbone_max_streams)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account or self.name)

    def node_info(self) -> NodeInfo:
        return NodeInfo(id="", role=ROLE_WAYPOINT, node=self.node, namespace=self.namespace, name=self.name)
