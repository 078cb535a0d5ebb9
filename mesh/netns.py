"""Network-namespace helpers shared by the local cluster and the node agent.

`setns(2)` changes the network namespace of the calling *thread* only.  `entered(name)` switches the
current thread into a named namespace (one under /run/netns) and back, so a socket created inside the
block lives in that namespace for good, which is how the node agent opens listeners inside pods.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mesh.errors import MeshError

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(MeshError):
    pass


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def list_named() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)} (this needs root: CAP_SYS_ADMIN)")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with this thread inside network namespace `name` (a name under /run/netns, or a
    path such as /proc/<pid>/ns/net).  Do not await inside the block: the thread must not switch tasks."""
    path = name if name.startswith("/") else str(netns_path(name))
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsError(f"network namespace {name!r} does not exist") from exc
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (`net.ipv4.ip_forward`) inside network namespace `name`."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(name), open(path, "w") as f:
        f.write(value)
