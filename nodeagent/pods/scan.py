"""Finding the network namespaces of pods that were running before the CNI plugin could hand them over
(the mesh was installed onto a running node, or the agent lost its record): by the pod's address.

Candidates are the namespaces the runtime pinned (containerd and CRI-O pin each sandbox's namespace under
/var/run/netns) and those of the processes the agent can see in /proc; the node's own namespace and the
agent's are never candidates.  Each candidate's local IPv4 addresses are read from its
`/proc/thread-self/net/fib_trie` while the reading thread is inside it.  An address found in more than
one namespace is ambiguous and matches none.  Run it off the event loop: it enters namespaces.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh import cgroup, netns
from mesh.errors import MeshError

log = logging.getLogger("nodeagent.pods.scan")

NETNS_DIRS = ("/var/run/netns",)
PROC = "/proc"


@dataclass(frozen=True)
class Namespace:
    path: str  # a path that opens it: a pinned file, or /proc/<pid>/ns/net
    ino: int  # its identity
    pid: int = 0  # a process inside it, where one was seen (its cgroup is the pod's)


def local_addresses(fib_trie: str) -> set[str]:
    """The local IPv4 addresses in a `fib_trie` listing: each `|-- <address>` followed by a
    `/32 host LOCAL` line."""
    found: set[str] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            last = text[3:].strip()
        elif text.startswith("/32 host LOCAL") and last:
            found.add(last)
    found.discard("127.0.0.1")
    return found


def cgroup_of(pid: int, proc: str = PROC) -> str:
    """The cgroup v2 directory of process `pid` ("" when it has none, or is gone)."""
    try:
        lines = Path(proc, str(pid), "cgroup").read_text().splitlines()
        root = cgroup.v2_root()
    except (OSError, MeshError):
        return ""
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return str(root / path.lstrip("/"))
    return ""


def _ino(path: str) -> int:
    return os.stat(path).st_ino


def candidates(netns_dirs: Iterable[str] = NETNS_DIRS, proc: str = PROC) -> list[Namespace]:
    """Every network namespace the agent can open, once each, without its own or the node's."""
    skip: set[int] = set()
    for own in ("/proc/self/ns/net", f"{proc}/1/ns/net"):
        with contextlib.suppress(OSError):
            skip.add(_ino(own))
    by_ino: dict[int, Namespace] = {}
    for directory in netns_dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                ino = _ino(path)
            except OSError:
                continue
            if ino not in skip:
                by_ino.setdefault(ino, Namespace(path, ino))
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        pids = []
    for pid in pids:
        path = f"{proc}/{pid}/ns/net"
        try:
            ino = _ino(path)
        except OSError:  # gone, or not ours to look at
            continue
        if ino in skip:
            continue
        known = by_ino.get(ino)
        if known is None or not known.pid:
            by_ino[ino] = Namespace(known.path if known else path, ino, pid)
    return list(by_ino.values())


def addresses_in(path: str) -> set[str]:
    with netns.entered(path), open("/proc/thread-self/net/fib_trie") as f:
        return local_addresses(f.read())


def find(ips: Iterable[str], netns_dirs: Iterable[str] = NETNS_DIRS, proc: str = PROC) -> dict[str, Namespace]:
    """The namespace holding each of `ips`, for those found in exactly one."""
    wanted = set(ips)
    if not wanted:
        return {}
    seen: dict[str, list[Namespace]] = {}
    for ns in candidates(netns_dirs, proc):
        try:
            held = addresses_in(ns.path) & wanted
        except (OSError, MeshError):
            continue
        for ip in held:
            seen.setdefault(ip, []).append(ns)
    for ip, where in seen.items():
        if len(where) > 1:
            log.warning("address %s is in %d network namespaces (%s): not adopting any", ip, len(where),
                        ", ".join(n.path for n in where))
    return {ip: where[0] for ip, where in seen.items() if len(where) == 1}
