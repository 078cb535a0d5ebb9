"""What a waypoint is started with: the flags every data plane process shares (`mesh.runtime`) and its
own, and what follows from them (its key, identity and discovery node).

`--workers N` is how many processes serve its data path (`waypoint.workers`); the default is the CPUs the
process may use (its affinity, and the cgroup's `cpu.max` quota: a container's CPU limit), at most
`MAX_DEFAULT_WORKERS`, as ztunnel's and Istio's waypoint Envoy's two worker threads."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mesh import defaults
from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.identity import SpiffeId
from mesh.runtime import ProcessOptions
from mesh.xds.node import ROLE_WAYPOINT, NodeInfo
from waypoint.gateway import ListenerSpec

ENGINES = ("uvloop", "trio")  # --engine
MAX_STREAMS = 65_536  # the most --hbone-max-streams may be
MAX_DEFAULT_WORKERS = 2  # the default --workers is the usable CPUs, at most this many
MAX_WORKERS = 8  # the most --workers may be: the control plane serves 8 discovery streams per identity
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD": no limit) allows, rounded up;
    None for no limit or text that is not a quota."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on (affinity), fewer if its cgroup's CPU limit says so."""
    cpus = len(os.sched_getaffinity(0)) or 1
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        path = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), "/")
        quota = cpu_quota((root / path.lstrip("/") / "cpu.max").read_text())
    except (OSError, IndexError):
        quota = None
    return min(cpus, quota) if quota else cpus


def default_workers() -> int:
    return max(1, min(usable_cpus(), MAX_DEFAULT_WORKERS))


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
    # processes serving the data path, sharing its ports (`waypoint.workers`); 1: one process, as always
    workers: int = 1
    worker_index: int = 0  # 0: the primary (or the only process); set by the primary on the workers it starts
    worker_channel: int = -1  # a worker's end of its channel to the primary (a file descriptor)
    # what moves the data path's bytes (`waypoint.engine`): "uvloop", or "trio" for all of it on trio
    engine: str = "uvloop"

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be a whole number from 1 to {MAX_WORKERS}, not {self.workers!r}")
        for flag, value in (("--hbone-max-connections", self.hbone_max_connections),
                            ("--hbone-max-handshakes", self.hbone_max_handshakes),
                            ("--hbone-max-streams", self.hbone_max_streams)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a whole number of at least 1, not {value!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
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
