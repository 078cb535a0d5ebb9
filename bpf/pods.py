"""A pod's side of the redirect: what its programs attach to, the settings they get, and what is
pinned for it.  No bcc here: `loader.py` compiles and loads; this module opens and checks the pod's
cgroup and network namespace, writes the pod's maps, reads back what is pinned and removes it.
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import ipaddress
import logging
import os
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bpf import layout, objects
from bpf.errors import BpfCallError, NoOriginalDestination, PodTargetError

log = logging.getLogger("bpf.pods")

NS_GET_NSTYPE = 0xB703  # linux/nsfs.h
CLONE_NEWNET = 0x40000000
SO_COOKIE = 57


class Outcome(enum.Enum):
    """What `Loader.attach_pod` did (see loader.py)."""

    INSTALLED = "installed"  # nothing was pinned for the pod
    ADOPTED = "adopted"  # exactly this build's set was pinned for this cgroup and namespace: kept
    REDONE = "redone"  # something else was pinned: replaced


@dataclass(frozen=True)
class LinkState:
    """One pinned link and the program it runs."""

    program: str
    link_id: int
    prog_id: int
    prog_tag: str
    attach_type: int
    cgroup_id: int  # for cgroup links; 0 once the cgroup is gone
    netns_ino: int  # for the netns link; 0 once the namespace is gone


@dataclass(frozen=True)
class MapState:
    """One pinned map and how full it is."""

    name: str
    map_id: int
    max_entries: int
    entries: int  # for inbound_sock: 1 while an agent's listener is in it


@dataclass(frozen=True)
class PodPrograms:
    """What is pinned for one pod, and whether it is exactly what this build would pin."""

    pod_id: str
    pin_dir: Path
    links: tuple[LinkState, ...] = ()
    maps: tuple[MapState, ...] = ()
    problems: tuple[str, ...] = ()  # why it is not exactly ours
    listener_cookie: int = 0  # SO_COOKIE of the socket in inbound_sock, 0 when empty

    @property
    def present(self) -> bool:
        return bool(self.links or self.maps or self.problems)

    @property
    def exact(self) -> bool:
        return self.present and not self.problems

    @property
    def cgroup_id(self) -> int:
        return next((s.cgroup_id for s in self.links if s.cgroup_id), 0)

    @property
    def netns_ino(self) -> int:
        return next((s.netns_ino for s in self.links if s.netns_ino), 0)


# --- what attach_pod is given ------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What the pod's programs read from its maps: its IP (network byte order, 0 if not given), the
    inbound ports to leave alone, and whether its DNS goes to the agent's DNS proxy."""

    pod_ip4: int
    skip_ports: tuple[int, ...]
    dns_capture: bool = False

    @staticmethod
    def of(pod_ip: str | None, skip_inbound_ports: Iterable[int], dns_capture: bool = False) -> Settings:
        ip4 = 0
        if pod_ip is not None:
            try:
                ip4 = layout.be32(str(ipaddress.IPv4Address(pod_ip)))
            except ValueError as exc:
                raise PodTargetError(f"pod IP {pod_ip!r} is not an IPv4 address") from exc
        ports = tuple(sorted(set(skip_inbound_ports)))
        if any(not 0 < p < 65536 for p in ports) or len(ports) > layout.INBOUND_SKIP_MAX_ENTRIES:
            raise PodTargetError(f"inbound ports to skip must be at most {layout.INBOUND_SKIP_MAX_ENTRIES} "
                                 f"port numbers (1-65535), not {list(ports)}")
        return Settings(ip4, ports, dns_capture)


class Target:
    """The opened cgroup and network namespace of one pod."""

    def __init__(self, netns_path: str, cgroup_path: str) -> None:
        self.cgroup_fd = _open_checked(cgroup_path, objects.CGROUP2_MAGIC, "cgroup",
                                       "a directory of the cgroup v2 hierarchy", os.O_DIRECTORY)
        try:
            self.netns_fd = _open_checked(netns_path, objects.NSFS_MAGIC, "network namespace",
                                          "a namespace file such as /run/netns/<name> or /proc/<pid>/ns/net", 0)
        except BaseException:
            os.close(self.cgroup_fd)
            raise
        self.cgroup_id = os.fstat(self.cgroup_fd).st_ino  # a cgroup v2 directory's inode is the cgroup id
        self.netns_ino = os.fstat(self.netns_fd).st_ino
        try:
            kind = fcntl.ioctl(self.netns_fd, NS_GET_NSTYPE)
        except OSError:
            kind = -1
        if kind != CLONE_NEWNET:
            self.close()
            raise PodTargetError(f"{netns_path} is a namespace, but not a network namespace")

    def fd_for(self, target: layout.Target) -> int:
        return self.cgroup_fd if target is layout.Target.CGROUP else self.netns_fd

    def close(self) -> None:
        os.close(self.cgroup_fd)
        os.close(self.netns_fd)


def _open_checked(path: str, magic: int, what: str, should_be: str, flags: int) -> int:
    try:
        if objects.fs_magic(path) != magic:
            raise PodTargetError(f"the {what} {path} is not {should_be}")
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    except FileNotFoundError as exc:
        raise PodTargetError(f"the {what} {path} does not exist: is the pod running?") from exc


def check_listener(sock: socket.socket, netns_ino: int) -> None:
    listening = sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6) and \
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    if not listening:
        raise PodTargetError("the inbound listener must be a listening TCP socket (the agent's 15006)")
    if objects.socket_netns_ino(sock) != netns_ino:
        raise PodTargetError("the inbound listener is not in the pod's network namespace: create it "
                             "there (setns into the pod's namespace, then socket())")


def ip4_address(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            raise NoOriginalDestination(f"{address} is not IPv4: only IPv4 connections are redirected")
        return str(ip.ipv4_mapped)
    return str(ip)


def cgroup2_mounted() -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[2] == "cgroup2" for line in f if len(line.split()) > 2)
    except OSError:
        return False


def keep(fds: list[int], fd: int) -> int:
    fds.append(fd)
    return fd


def write_settings(maps: dict[str, int], listener: socket.socket, settings: Settings) -> None:
    objects.map_update(maps[layout.MAP_POD_CONFIG], ctypes.c_uint32(0), layout.PodConfig(pod_ip4=settings.pod_ip4,
                                                                                 dns_capture=int(settings.dns_capture)),
                       "the pod's settings")
    skip = maps[layout.MAP_INBOUND_SKIP]
    for raw in objects.map_keys(skip, 2):
        objects.map_delete(skip, ctypes.c_uint16.from_buffer_copy(raw))
    for port in settings.skip_ports:
        objects.map_update(skip, ctypes.c_uint16(port), ctypes.c_uint8(1), f"inbound port {port} to skip")
    objects.map_update(maps[layout.MAP_INBOUND_SOCK], ctypes.c_uint32(0), ctypes.c_uint64(listener.fileno()),
                       "the inbound listener into the sockmap")


def count_entries(fd: int, info: objects.MapInfo) -> int:
    if info.type == layout.MAP_TYPE_ARRAY:
        return info.max_entries
    if info.type == layout.MAP_TYPE_SOCKMAP:
        return 1 if listener_cookie(fd) else 0
    return len(objects.map_keys(fd, info.key_size))


def listener_cookie(sockmap_fd: int) -> int:
    value = ctypes.c_uint64(0)
    try:
        found = objects.map_lookup(sockmap_fd, ctypes.c_uint32(0), value)
    except BpfCallError:
        return 0
    return value.value if found else 0


def remove_pins(d: Path) -> bool:
    """Detaches the pinned links in `d`, unpins everything and removes it; False if `d` did not exist."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return False
    for name in names:
        path = d / name
        if name.startswith("link_"):
            try:
                fd = objects.get_pinned(str(path))
                try:
                    objects.link_detach(fd)
                finally:
                    os.close(fd)
            except BpfCallError as exc:
                log.debug("detaching %s: %s", path, exc)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            remove_pins(path)
        else:
            os.unlink(path)
    os.rmdir(d)
    return True


def socket_cookie(sock: socket.socket) -> int:
    """SO_COOKIE of a socket (what inspect_pod reports as listener_cookie)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)
