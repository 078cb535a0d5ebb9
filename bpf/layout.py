"""The Python side of bpf/redirect.h, and where things are pinned.

Every `#define` and struct of the header is mirrored here (tests/unit/bpf/test_layout.py parses the
header and compares, so the two cannot drift).  Addresses and ports in the ctypes structures are in
network byte order, as in the header; `be32` / `be16` and their inverses convert.

Pins: one directory per pod, `<bpffs>/<prefix>/<pod key>/`, holding `map_<name>` for each map and
`link_<program>` for each program's attachment.  The pod key is the pod id with every character other
than letters, digits, `-` and `_` percent-encoded (so `default/web-1` is `default%2Fweb-1`): reversible,
free of `.` (which bpffs refuses in names) and of `~` (which the loader keeps for staging directories).
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

# --- mirrored from redirect.h -------------------------------------------------------------------
OUTBOUND_PORT = 15001
INBOUND_PLAIN_PORT = 15006
HBONE_PORT = 15008
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
DNS_PORT_QUERY = 53
DNS_PORT_PROXY = 15053
AGENT_MARK = 0x539
TRANSPARENT_PORT_MIN = 20000
TRANSPARENT_PORT_MAX = 29999
ORIG_DST_MAX_ENTRIES = 16384
INBOUND_SKIP_MAX_ENTRIES = 64

AGENT_PORTS = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT, ADMIN_PORT, METRICS_PORT, READINESS_PORT)


class OrigDst(ctypes.Structure):
    _fields_ = [("ip4", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class ConnKey(ctypes.Structure):
    _fields_ = [("app_ip4", ctypes.c_uint32), ("proxy_ip4", ctypes.c_uint32),
                ("app_port", ctypes.c_uint16), ("proxy_port", ctypes.c_uint16)]


class PodConfig(ctypes.Structure):
    _fields_ = [("pod_ip4", ctypes.c_uint32), ("dns_capture", ctypes.c_uint32)]


HEADER_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "orig_dst": OrigDst, "conn_key": ConnKey, "pod_config": PodConfig,
}

# --- the programs and maps ------------------------------------------------------------------------
HEADER = "redirect.h"


class Target(enum.Enum):
    """What a program attaches to."""

    CGROUP = "cgroup"
    NETNS = "netns"


# Kernel enums (uapi/linux/bpf.h) for the types used here.
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_SK_LOOKUP = 30
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP4_RECVMSG = 19
ATTACH_SK_LOOKUP = 36
LINK_TYPE_CGROUP = 3
LINK_TYPE_NETNS = 5
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_SOCKMAP = 15


@dataclass(frozen=True)
class ProgramSpec:
    name: str  # the C function, also the name the kernel shows
    source: str  # file beside this module
    prog_type: int
    attach_type: int
    target: Target

    @property
    def pin_name(self) -> str:
        return f"link_{self.name}"


PROGRAMS = (
    ProgramSpec("connect4", "connect.bpf.c", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT, Target.CGROUP),
    ProgramSpec("connect6", "connect.bpf.c", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET6_CONNECT, Target.CGROUP),
    ProgramSpec("sockops", "connect.bpf.c", PROG_TYPE_SOCK_OPS, ATTACH_CGROUP_SOCK_OPS, Target.CGROUP),
    ProgramSpec("sendmsg4", "connect.bpf.c", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_SENDMSG, Target.CGROUP),
    ProgramSpec("recvmsg4", "connect.bpf.c", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_RECVMSG, Target.CGROUP),
    ProgramSpec("steer_inbound", "sklookup.bpf.c", PROG_TYPE_SK_LOOKUP, ATTACH_SK_LOOKUP, Target.NETNS),
)
SOURCES = tuple(dict.fromkeys(p.source for p in PROGRAMS))

MAP_ORIG_BY_COOKIE = "orig_by_cookie"
MAP_ORIG_BY_CONN = "orig_by_conn"
MAP_POD_CONFIG = "pod_config"
MAP_INBOUND_SOCK = "inbound_sock"
MAP_INBOUND_SKIP = "inbound_skip"
MAPS = (MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_CONN, MAP_POD_CONFIG, MAP_INBOUND_SOCK, MAP_INBOUND_SKIP)


def map_pin_name(name: str) -> str:
    return f"map_{name}"


def pin_names() -> frozenset[str]:
    """Every file a complete pod directory holds."""
    return frozenset([map_pin_name(m) for m in MAPS] + [p.pin_name for p in PROGRAMS])


# --- pod keys -------------------------------------------------------------------------------------
_KEEP = re.compile(r"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def pod_key(pod_id: str) -> str:
    if not pod_id:
        raise ValueError("a pod id must not be empty")
    return "".join(c if _KEEP.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in pod_id)


def pod_id_of(key: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), key).encode("latin-1").decode()


def pod_dir(root: Path, pod_id: str) -> Path:
    return root / pod_key(pod_id)


# --- byte order -----------------------------------------------------------------------------------
def be32(ip4: str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network byte order."""
    return int.from_bytes(ipaddress.IPv4Address(ip4).packed, sys.byteorder)


def ip4_of(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, sys.byteorder)))


def be16(port: int) -> int:
    return socket.htons(port)


def port_of(value: int) -> int:
    return socket.ntohs(value)
