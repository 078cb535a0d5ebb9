"""Kernel objects the loader handles, through libbpf (the C library bcc itself is built on): maps,
links, pins, object info, and the file-system checks around them.

Typed wrappers around `ctypes` calls, so that the loader's logic reads as Python and only
`loader.py` deals with bcc.  Every failing call raises `BpfCallError` with the errno.
File descriptors returned here belong to the caller, who closes them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import os
import socket
from dataclasses import dataclass

from bpf.errors import BpfCallError, EbpfUnavailable

BPF_ANY = 0
BPFFS_MAGIC = 0xCAFE4A11
CGROUP2_MAGIC = 0x63677270
NSFS_MAGIC = 0x6E736673
SIOCGSKNS = 0x894C  # linux/sockios.h: the network namespace of a socket, as a new fd

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_c_int, _c_u32, _c_ptr, _c_str = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_char_p


_SIGNATURES: dict[str, list[type]] = {
    "bpf_obj_pin": [_c_int, _c_str], "bpf_obj_get": [_c_str],
    "bpf_link_create": [_c_int, _c_int, _c_int, _c_ptr], "bpf_link_detach": [_c_int],
    "bpf_prog_get_fd_by_id": [_c_u32],
    "bpf_obj_get_info_by_fd": [_c_int, _c_ptr, ctypes.POINTER(_c_u32)],
    "bpf_map_create": [_c_int, _c_str, _c_u32, _c_u32, _c_u32, _c_ptr],
    "bpf_map_update_elem": [_c_int, _c_ptr, _c_ptr, ctypes.c_uint64],
    "bpf_map_lookup_elem": [_c_int, _c_ptr, _c_ptr], "bpf_map_delete_elem": [_c_int, _c_ptr],
    "bpf_map_lookup_and_delete_elem": [_c_int, _c_ptr, _c_ptr],
    "bpf_map_get_next_key": [_c_int, _c_ptr, _c_ptr],
    "bpf_prog_load": [_c_int, _c_str, _c_str, _c_ptr, ctypes.c_size_t, _c_ptr],
}


@functools.cache
def _lib() -> ctypes.CDLL:
    """libbpf, opened on first use (so that importing this module needs nothing installed)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, _c_int
    except (OSError, AttributeError) as exc:
        raise EbpfUnavailable(f"libbpf 1.x is not installed ({exc}); it comes with python3-bpfcc "
                              "(Debian package libbpf1)") from exc
    return lib


def _check(ret: int, what: str) -> int:
    """libbpf (1.x) returns -errno on failure."""
    if ret < 0:
        raise BpfCallError(what, -ret)
    return ret


# --- pins and links ---------------------------------------------------------------------------------
def pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pinning at {path}")


def get_pinned(path: str) -> int:
    return _check(_lib().bpf_obj_get(path.encode()), f"opening the pinned object {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    return _check(_lib().bpf_link_create(prog_fd, target_fd, attach_type, None), f"attaching {what}")


def link_detach(link_fd: int) -> None:
    _check(_lib().bpf_link_detach(link_fd), "detaching a link")


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"opening program #{prog_id}")


# --- object info --------------------------------------------------------------------------------------
class _ProgInfo(ctypes.Structure):  # the head of struct bpf_prog_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


class _MapInfo(ctypes.Structure):  # the head of struct bpf_map_info
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


class _CgroupLink(ctypes.Structure):
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("attach_type", ctypes.c_uint32)]


class _NetnsLink(ctypes.Structure):
    _fields_ = [("netns_ino", ctypes.c_uint32), ("attach_type", ctypes.c_uint32)]


class _LinkTarget(ctypes.Union):
    _fields_ = [("cgroup", _CgroupLink), ("netns", _NetnsLink), ("_room", ctypes.c_uint64 * 4)]


class _LinkInfo(ctypes.Structure):  # struct bpf_link_info, with the union members used here
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("target", _LinkTarget)]


LINK_TYPE_CGROUP = 3
LINK_TYPE_NETNS = 5


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str  # hex, as bpftool shows it
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    attach_type: int
    cgroup_id: int  # for cgroup links (0 once the cgroup is gone)
    netns_ino: int  # for netns links (0 once the namespace is gone)


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"reading {what}")


def prog_info(fd: int) -> ProgInfo:
    head = _ProgInfo()
    _info(fd, head, "program info")
    ids = (ctypes.c_uint32 * max(head.nr_map_ids, 1))()
    full = _ProgInfo(nr_map_ids=head.nr_map_ids, map_ids=ctypes.addressof(ids))
    _info(fd, full, "program info")
    return ProgInfo(id=full.id, type=full.type, name=full.name.decode(), tag=bytes(full.tag).hex(),
                    map_ids=tuple(sorted(ids[: min(full.nr_map_ids, head.nr_map_ids)])))


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _info(fd, info, "map info")
    return MapInfo(id=info.id, type=info.type, name=info.name.decode(), key_size=info.key_size,
                   value_size=info.value_size, max_entries=info.max_entries, flags=info.map_flags)


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    _info(fd, info, "link info")
    cgroup, netns = info.target.cgroup, info.target.netns
    is_cgroup = info.type == LINK_TYPE_CGROUP
    attach = cgroup.attach_type if is_cgroup else netns.attach_type if info.type == LINK_TYPE_NETNS else 0
    return LinkInfo(id=info.id, type=info.type, prog_id=info.prog_id, attach_type=attach,
                    cgroup_id=cgroup.cgroup_id if is_cgroup else 0,
                    netns_ino=netns.netns_ino if info.type == LINK_TYPE_NETNS else 0)


# --- programs ---------------------------------------------------------------------------------------
class _ProgLoadOpts(ctypes.Structure):  # libbpf's struct bpf_prog_load_opts (1.1; `sz` tells later versions)
    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
                ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_char_p)]


VERIFIER_LOG_SIZE = 1 << 16


def prog_load(prog_type: int, name: str, insns: bytes | bytearray, license: str, *, kern_version: int = 0,
              expected_attach_type: int = 0) -> int:
    """Loads compiled instructions (8 bytes each) as a program; the program fd.  When the kernel refuses
    them, the load is tried once more with the verifier's log, whose end goes into the error."""
    code = (ctypes.c_char * len(insns)).from_buffer_copy(bytes(insns))

    def load(log: ctypes.Array[ctypes.c_char] | None) -> int:
        opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type,
                             kern_version=kern_version, log_level=1 if log is not None else 0,
                             log_size=len(log) if log is not None else 0,
                             log_buf=ctypes.cast(log, ctypes.c_char_p) if log is not None else None)
        return int(_lib().bpf_prog_load(prog_type, name[:15].encode(), license.encode(), code, len(insns) // 8,
                                        ctypes.byref(opts)))

    fd = load(None)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
    retry = load(log)
    if retry >= 0:
        return retry
    tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
    return _check(fd, f"loading program {name}" + (f" (verifier: {' / '.join(tail)})" if tail else ""))


# --- maps -------------------------------------------------------------------------------------------
class _MapCreateOpts(ctypes.Structure):  # libbpf's struct bpf_map_create_opts
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("map_extra", ctypes.c_uint64), ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


def map_create(spec: MapInfo) -> int:
    """A new map shaped like `spec` (its id is ignored)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=spec.flags)
    return _check(_lib().bpf_map_create(spec.type, spec.name.encode(), spec.key_size, spec.value_size,
                                      spec.max_entries, ctypes.byref(opts)), f"creating map {spec.name}")


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, what: str) -> None:
    _check(_lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY), f"writing {what}")


def map_delete(fd: int, key: ctypes._CData) -> bool:
    """False when the key was not there."""
    ret = _lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0 and -ret != 2:  # ENOENT
        _check(ret, "deleting a map entry")
    return ret == 0


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """False when the key is not there."""
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0 and -ret != 2:  # ENOENT
        _check(ret, "reading a map entry")
    return ret == 0


def map_take(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Read and delete one entry in one step; False when the key was not there."""
    ret = _lib().bpf_map_lookup_and_delete_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0 and -ret != 2:
        _check(ret, "reading a map entry")
    return ret == 0


def map_keys(fd: int, key_size: int, limit: int = 1 << 20) -> list[bytes]:
    """The keys of a hash map (for inspection; not atomic with respect to the programs)."""
    keys: list[bytes] = []
    prev, nxt = ctypes.create_string_buffer(key_size), ctypes.create_string_buffer(key_size)
    ret = _lib().bpf_map_get_next_key(fd, None, nxt)
    while ret == 0 and len(keys) < limit:
        keys.append(nxt.raw)
        ctypes.memmove(prev, nxt, key_size)
        ret = _lib().bpf_map_get_next_key(fd, prev, nxt)
    return keys


# --- file systems and namespaces ----------------------------------------------------------------------
def fs_magic(path: str) -> int:
    """statfs(2) f_type of the file system holding `path`; raises FileNotFoundError if it is missing."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64 and arm64
    if _libc.statfs(path.encode(), buf) != 0:
        err = ctypes.get_errno()
        raise FileNotFoundError(err, os.strerror(err), path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def mount_bpffs(path: str) -> None:
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        raise BpfCallError(f"mounting a BPF file system at {path}", ctypes.get_errno())


def socket_netns_ino(sock: socket.socket) -> int:
    """The inode of the network namespace a socket belongs to."""
    ns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(ns_fd).st_ino
    finally:
        os.close(ns_fd)
