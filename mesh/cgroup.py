"""cgroup v2 helpers shared by the local cluster (one cgroup per pod, as a kubelet makes) and the node
agent (whose eBPF capture attaches to a pod's cgroup).

The v2 hierarchy is found where it is mounted: `/sys/fs/cgroup` on a pure v2 system, or
`/sys/fs/cgroup/unified` in the hybrid layout.  A process joins a cgroup by writing its pid (or 0, for
itself) into the cgroup's `cgroup.procs`; children inherit it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from mesh.errors import MeshError

MOUNTS = Path("/proc/self/mounts")


class CgroupError(MeshError):
    pass


def v2_root(mounts: str | None = None) -> Path:
    """Where the cgroup v2 hierarchy is mounted; CgroupError when it is not."""
    text = mounts if mounts is not None else MOUNTS.read_text()
    found = [line.split()[1] for line in text.splitlines() if len(line.split()) > 2 and line.split()[2] == "cgroup2"]
    if not found:
        raise CgroupError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    return Path(sorted(found, key=len)[0])


def create(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror} (this needs root)") from exc
    return path


def join_self(path: Path) -> None:
    """Move the calling process into cgroup `path` (safe in a child between fork and exec)."""
    fd = os.open(path / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def remove_tree(path: Path, timeout: float = 5.0) -> bool:
    """Kill whatever runs in `path` and below, then remove the cgroups, deepest first; whether anything
    was there."""
    if not path.is_dir():
        return False
    kill = path / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    deadline = time.monotonic() + timeout
    for d in [*dirs, path]:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:  # EBUSY while the killed processes are still exiting
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {d}: {exc.strerror}") from exc
                time.sleep(0.02)
    return True
