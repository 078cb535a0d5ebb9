"""A listening port that a process and its successor share, so that a restart refuses no connection.

A node agent that is restarted (or upgraded: a DaemonSet's surge) starts its successor first; both then
listen on the same ports in the same network namespace, as ztunnel does, until the old one has drained:

    share(sock)           SO_REUSEPORT, before bind: the listeners of one port form one group
    prefer_newest(sock)   after listen: every new connection goes to the group's second listener (the
                          successor) while there are two; alone, a listener takes them all.  A classic BPF
                          program on the group (SO_ATTACH_REUSEPORT_CBPF) that answers "index 1": the kernel
                          falls back to its hash when the index is out of range, i.e. with one listener.
    owned_by(uid)         sockets made in the block belong to `uid` (the thread's fsuid): the kernel lets
                          only sockets of one owner share a port, so a process of another user (a pod's
                          application, even as root) cannot join the group and take connections from it.
    migrate_requests(ns)  net.ipv4.tcp_migrate_req=1 in that namespace: connections still queued on a
                          listener that closes move to another listener of its group instead of being reset.

The order of a handover: the successor binds (`share`, `prefer_newest`: it takes the new connections from
then on), the old process closes its listeners (what its queues held migrates), finishes what it has
open, and exits.  The group's program is the group's, not a socket's: it outlives the listener that set it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from mesh import netns
from mesh.errors import MeshError

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant
_NEWEST = 1  # the index the program answers: the second listener of the group (the first one's successor)
MIGRATE_SYSCTL = "net.ipv4.tcp_migrate_req"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class ReuseportError(MeshError):
    pass


def share(sock: socket.socket) -> None:
    """Let `sock` (not bound yet) listen on a port that another listener of the same owner has."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def prefer_newest(sock: socket.socket) -> None:
    """Give the port group of `sock` (listening) the program that sends new connections to its second
    listener, the successor, while there are two."""
    program = (ctypes.c_char * 8).from_buffer_copy(struct.pack("=HBBI", _BPF_RET_K, 0, 0, _NEWEST))
    # struct sock_fprog: unsigned short len; (padding) struct sock_filter *filter.  The kernel copies the
    # program during the call, so `program` only has to live until it returns.
    fprog = struct.pack("=H6xQ", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


@contextmanager
def owned_by(uid: int) -> Iterator[None]:
    """Sockets made in the block (by this thread: no await inside) belong to `uid`.  Raises
    ReuseportError when the process may not (it needs CAP_SETUID)."""
    previous = _libc.setfsuid(uid)
    if _libc.setfsuid(uid) != uid:  # setfsuid answers with the fsuid before the call: it did not change
        _libc.setfsuid(previous)
        raise ReuseportError(f"cannot make sockets owned by uid {uid}: the process lacks CAP_SETUID")
    try:
        yield
    finally:
        _libc.setfsuid(previous)


def migrate_requests(netns_name: str) -> None:
    """Connections queued on a listener that closes go to another listener of its port group, in the
    network namespace `netns_name` (a name or a path).  Raises OSError where /proc/sys is read-only."""
    netns.write_sysctl(netns_name, MIGRATE_SYSCTL, "1")
