"""What a node agent is started with: the flags every data plane process shares (`mesh.runtime`) and
its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh import defaults
from mesh.runtime import ProcessOptions


@dataclass(frozen=True, kw_only=True)
class Options(ProcessOptions):
    node: str  # this node's name
    pod_netns: str  # path format of a pod's network namespace, with {namespace}, {name} and {uid}
    pod_cgroup: str = ""  # path format of a pod's cgroup v2 directory (eBPF capture attaches there)
    redirect_mode: str = defaults.REDIRECT_MODE
    bpf_prefix: str = defaults.BPF_PIN_PREFIX  # eBPF mode: pins under /sys/fs/bpf/<prefix>/
    state_dir: Path | None = None  # where the agent keeps what it must find after a restart
