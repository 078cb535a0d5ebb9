"""Small I/O helpers the harness shares: HTTP GETs and commands inside a pod's or node's namespace,
and CPU / memory figures of processes from /proc."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mesh.serve import client
from mesh.serve.errors import NoAnswer, Unreachable

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProbeError(Exception):
    """A probe (an HTTP GET, a command in a namespace) that did not answer."""


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 3.0) -> str:
    """GET http://host:port/path from inside network namespace `netns`; the body as text."""
    try:
        reply = client.get(client.Endpoint.tcp(host, port, netns=netns), path, timeout=timeout)
    except Unreachable as exc:
        raise ProbeError(f"{host}:{port} in {netns}: {exc.strerror}") from exc
    except NoAnswer as exc:
        raise ProbeError(f"GET {path} on {host}:{port} in {netns}: {exc.__cause__}") from exc
    if reply.status != 200:
        raise ProbeError(f"GET {path} on {host}:{port} in {netns}: HTTP {reply.status}")
    return reply.text


def run_in(netns: str, argv: list[str], stdin: str | None = None, timeout: float = 30.0,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True,
                         timeout=timeout, check=False)
    if check and out.returncode != 0:
        raise ProbeError(f"{' '.join(argv)} in {netns} exited {out.returncode}: "
                         f"{(out.stderr or out.stdout).strip()[-500:]}")
    return out


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (threads are counted with their process)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found = [pid]
    i = 0
    while i < len(found):
        found.extend(children.get(found[i], []))
        i += 1
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads; children that exited are not included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in descendants(pid))


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the peak resident set of the process tree's largest member, in KiB."""
    best = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            continue
    return best


def rss_kib(pid: int) -> int:
    """VmRSS now: the resident set of the process tree (its members summed), in KiB."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class Proc:
    """A mesh process whose cost is measured: a node agent, a waypoint or an Envoy."""

    role: str  # "nodeagent node-1", "envoy client", ...
    pid: int

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()
