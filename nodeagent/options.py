"""What a node agent is started with: the flags every data plane process shares (`mesh.runtime`) and
its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh import defaults
from mesh.runtime import ProcessOptions
from nodeagent import memory
from nodeagent.cni.protocol import DEFAULT_SOCKET as CNI_SOCKET

POD_SOURCES = ("local", "cni")


@dataclass(frozen=True, kw_only=True)
class Options(ProcessOptions):
    node: str  # this node's name
    pod_source: str = "local"  # local: pods from discovery, netns by --pod-netns; cni: handed over by the plugin
    cni_socket: str = CNI_SOCKET  # pod source cni: where the CNI plugin hands pods over
    pod_netns: str = ""  # pod source local: path format of a pod's netns, with {namespace}, {name} and {uid}
    pod_cgroup: str = ""  # path format of a pod's cgroup v2 directory (eBPF capture attaches there; pod source
    # cni: only for running pods a scan finds, where no process shows their cgroup)
    redirect_mode: str = defaults.REDIRECT_MODE
    bpf_prefix: str = defaults.BPF_PIN_PREFIX  # eBPF mode: pins under /sys/fs/bpf/<prefix>/
    state_dir: Path | None = None  # where the agent keeps what it must find after a restart
    hbone_max_connections: int = defaults.HBONE_MAX_CONNECTIONS  # per pod's 15008: open at once
    hbone_max_handshakes: int = defaults.HBONE_MAX_HANDSHAKES  # per pod's 15008: TLS handshakes at once
    drain_seconds: float = defaults.DRAIN_SECONDS  # on SIGTERM: how long the pods' open connections may finish
    dns_capture: bool = defaults.DNS_CAPTURE  # the DNS proxy: pods' queries to port 53 go to 127.0.0.1:15053
    dns_upstream: tuple[tuple[str, int], ...] = ()  # where unknown names are forwarded (); the agent's resolv.conf
    dns_timeout: float = 2.0  # seconds an upstream resolver has to answer
    memory_trim_interval: float = memory.TRIM_INTERVAL  # seconds between looks for a dropped load (0: never trim)
