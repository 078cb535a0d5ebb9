"""Processes of a local cluster: start them inside a network namespace, find them, stop them.

Each process is started with `ip netns exec`, which also bind-mounts `/etc/netns/<netns>/hosts` and
`resolv.conf` over the pod's view of `/etc`, so names resolve as in a Kubernetes pod.  Every process
carries `AMB_CLUSTER=<cluster>` in its environment: `down` finds and stops them by that marker even
after a crashed `up` lost its record, and a PID is only signalled if its start time matches the record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localcluster.sandbox import Sandbox
from mesh import cgroup as mcgroup
from mesh import netns as mnetns

MARKER = "AMB_CLUSTER"


@dataclass(frozen=True)
class ProcessRecord:
    name: str  # "pod bookinfo/sleep", "nodeagent node-1", ...
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled PID from ours
    netns: str
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(**{k: data[k] for k in ("name", "pid", "start_time", "netns", "log")})


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_running(rec: ProcessRecord) -> bool:
    if start_time(rec.pid) != rec.start_time:
        return False
    try:
        state = Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def spawn(cluster: str, name: str, netns: str, argv: list[str], env: Mapping[str, str], log: Path,
          cwd: str | None = None, cgroup: Path | None = None, host_mounts: bool = False,
          sandbox: Sandbox | None = None) -> ProcessRecord:
    """Start `argv` inside `netns` (the host's own namespace when empty), detached in its own session,
    output appended to `log`; inside cgroup v2 directory `cgroup` when given (a pod's own), and in
    `sandbox` when given (a pod's: its user, no capabilities, the clusters' state hidden).

    A pod's process gets `ip netns exec`'s view: its own /etc/hosts and resolv.conf, and a /sys of its
    namespace.  With `host_mounts` only the network namespace is entered and the host's mounts stay
    visible, as a DaemonSet's hostPath volumes make them: the node agent needs the host's cgroup v2
    hierarchy and BPF file system (pins must outlive it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(env)
    full_env[MARKER] = cluster
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _entering(netns, host_mounts) + (sandbox.argv(argv) if sandbox is not None else argv),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
            start_new_session=True, close_fds=True, preexec_fn=in_child(cgroup, sandbox),
        )
    st = start_time(proc.pid)
    return ProcessRecord(name=name, pid=proc.pid, start_time=st or 0, netns=netns, log=str(log))


def in_child(cgroup: Path | None, sandbox: Sandbox | None) -> Callable[[], None] | None:
    """What a pod's process does between fork and exec: join its cgroup, then make its private mounts."""
    if cgroup is None and sandbox is None:
        return None

    def run() -> None:
        if cgroup is not None:
            mcgroup.join_self(cgroup)
        if sandbox is not None:
            sandbox.enter()

    return run


def _entering(netns: str, host_mounts: bool) -> list[str]:
    if not netns:
        return []
    if host_mounts:
        return ["nsenter", f"--net={mnetns.netns_path(netns)}", "--"]
    return ["ip", "netns", "exec", netns]


def marked_pids(cluster: str) -> list[int]:
    """PIDs of processes whose environment carries this cluster's marker."""
    needle = f"{MARKER}={cluster}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(x) for x in out.stdout.split() if x.isdigit()]


def stop(pids: Iterable[int], grace: float = 3.0) -> None:
    """SIGTERM each process group, then SIGKILL what is still there after `grace` seconds."""
    pids = [p for p in set(pids) if p != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child, so it does not linger as a zombie
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def tail(path: str | Path, lines: int = 10) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
