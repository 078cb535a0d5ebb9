"""How the local cluster runs what runs in a pod: as a container runtime would, not as root.

A process started in a pod (its command, `meshctl exec`, a waypoint) gets:

- its own user: the Pod's `securityContext.runAsUser` / `runAsGroup` (`localcluster.spec`), else a uid of
  its own, `POD_UID_BASE` + its place in the cluster file (the range Debian's /etc/subuid gives containers;
  one uid per pod, since pods share the host's PID namespace: two pods of one uid could signal or trace
  each other); supplementary groups cleared;
- no capabilities: bounding, ambient and inheritable sets emptied, so neither its uid (even 0) nor a
  set-uid or file-capability binary gives any back, and `no_new_privs`.  So it cannot change its network
  namespace's rules (`iptables -t nat -F`: EPERM), mark its sockets (SO_MARK 0x539, which the capture
  skips, needs CAP_NET_ADMIN), or enter another namespace;
- a private mount namespace in which the local clusters' state (`state.state_root()`, and the default
  root `/run/ambient-mesh`: the CA's key, the token key, node tokens, the store, other pods' logs, the CNI
  state) is covered by an empty read-only tmpfs, with only the directories `expose` names shown again,
  read-only (a waypoint's own: its token and the trust bundle).  When a state root lies in a directory
  other users may not traverse (a test's private temporary directory), that directory is covered
  instead, so that what is shown again is reachable (`cover_point`).  `ip netns exec` then adds what it
  always does: the pod's /etc/hosts and resolv.conf, and a /sys of its network namespace.

Choice: the privileges are dropped by util-linux's `setpriv` (a small audited tool operators know, that
does the order right: groups, gid, uid, capability sets, no_new_privs), run last before the command;
the mounts are made in the child before it execs `ip netns exec` (`Sandbox.enter`, through the `mount`
and `unshare` system calls: no helper process).  Not done: a PID namespace, seccomp, user namespaces,
a read-only root file system (the host's is visible, as an image's would be, read-only where its
permissions say so); pods may bind only ports from 1024 (no CAP_NET_BIND_SERVICE).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localcluster import state

POD_UID_BASE = 100000  # a pod without runAsUser: this plus its place in the cluster file
WAYPOINT_UID_BASE = 150000  # a waypoint pod: this plus the controller's count of waypoints started
NOBODY = 65534
MAX_ID = 2**31 - 1  # as Kubernetes validates runAsUser and runAsGroup

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
O_PATH = 0o10000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)  # loaded before any fork


@dataclass(frozen=True)
class Sandbox:
    """Who a pod's process runs as and what it may see (see the module docstring)."""

    uid: int
    gid: int
    hide: tuple[Path, ...]  # directories covered by an empty, read-only tmpfs
    expose: tuple[Path, ...] = ()  # directories under a hidden one shown again, read-only

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run as the sandbox's user with no capabilities and no_new_privs."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--inh-caps=-all",
                "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *command]

    def enter(self) -> None:
        """The private mounts, in the calling process (a child between fork and exec): a mount namespace
        of its own, not propagating back to the host's, with `hide` covered and `expose` shown again."""
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, MS_REC | MS_SLAVE)
        # Held open in the new namespace (a bind mount's source must be one of its mounts) before they are
        # covered, then mounted again on top.
        shown = [(path, os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for path in self.expose]
        try:
            for path in self.hide:
                _mount("tmpfs", str(path), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
            for path, fd in shown:
                os.makedirs(path, mode=0o755, exist_ok=True)  # in the tmpfs
                _mount(f"/proc/self/fd/{fd}", str(path), None, MS_BIND)
                _mount(None, str(path), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            for path in self.hide:
                _mount(None, str(path), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        finally:
            for _, fd in shown:
                os.close(fd)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def cover_point(root: Path) -> Path:
    """Where to cover `root`: itself, or the outermost of its ancestors that other users may not traverse
    (pytest's private temporary directories), so that what is shown again under it can be reached by
    the pod's user (the new tmpfs is traversable)."""
    for ancestor in reversed(root.parents):
        try:
            if ancestor != Path(ancestor.anchor) and not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:
            break
    return root


def hidden_roots(state_root: Path, default_root: Path) -> tuple[Path, ...]:
    """The state roots a pod must not see (`cover_point` of each): the one in use and the default one,
    those that exist (a mount needs its mount point), leaving out one inside the other (covered with it)."""
    roots = sorted({cover_point(p.resolve()) for p in (state_root, default_root) if p.is_dir()},
                   key=lambda p: len(p.parts))
    kept: list[Path] = []
    for root in roots:
        if not any(root.is_relative_to(outer) for outer in kept):
            kept.append(root)
    return tuple(kept)


def for_pod(uid: int, gid: int, expose: Sequence[Path] = ()) -> Sandbox:
    """A pod's sandbox: `uid` and `gid`, every cluster's state hidden but `expose`."""
    return Sandbox(uid, gid, hidden_roots(state.state_root(), state.DEFAULT_STATE_ROOT), tuple(expose))
