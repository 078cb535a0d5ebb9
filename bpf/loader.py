"""Loads the redirect programs into pods, pins them, adopts them after a restart.

bcc compiles `connect.bpf.c` and `sklookup.bpf.c` once per process, in a short-lived child process
(`bpf.compiler`, the only bcc importer), so that LLVM and the compiler's heap never stay in the agent.
Every pod then gets its own maps and its own copies of the programs: the compiled instructions with the
map references pointed at that pod's maps (bcc writes a map's fd into each instruction that loads it; the
copy gets the pod's map fd instead), loaded with libbpf.  (Per-pod maps, because each pod's sockmap holds that pod's
listener, and because connection 4-tuples seen through loopback repeat from pod to pod.)  The programs are attached with BPF links (connect4, connect6
and sockops to the pod's cgroup, steer_inbound to its network namespace) and links and maps are
pinned under `<bpffs>/<prefix>/<pod key>/` (see layout.py), so redirection outlives the process that
set it up: with the agent gone, the pod's connections are refused rather than let through (fail
closed, as the iptables rules do), and the next agent adopts what is pinned.

`attach_pod` says what it did:
  INSTALLED  nothing was pinned for the pod; attached anew.
  ADOPTED    exactly this build's programs were pinned, attached to this cgroup and namespace, with
             their own maps; kept as they are, with the settings and the 15006 listener written anew.
             "Exactly" means: every pin there, nothing else; each link of the right attach type, to
             this cgroup or namespace, running a program whose kernel tag (a hash of its code, map fds
             left out) is this build's; each map of this build's shape and the one its programs use.
  REDONE     something else was pinned (another build, a half-removed set, other targets); a new set
             was attached before the old one was detached, so the pod is never left uncaptured.
A new set is built in a staging directory (`~new~<pod key>`) and renamed into place when complete; on any failure
everything new is closed and unpinned, so nothing half-attached is left.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpf import layout, objects
from bpf.compiler import shape
from bpf.errors import AttachError, BpfCallError, BpfError, EbpfUnavailable, NoOriginalDestination
from bpf.pods import (
    LinkState,
    MapState,
    Outcome,
    PodPrograms,
    Settings,
    Target,
    cgroup2_mounted,
    check_listener,
    count_entries,
    ip4_address,
    keep,
    listener_cookie,
    remove_pins,
    socket_cookie,
    write_settings,
)

__all__ = ["DEFAULT_BPFFS", "DEFAULT_PREFIX", "LinkState", "Loader", "MapState", "Outcome", "PodPrograms",
           "socket_cookie"]

log = logging.getLogger("bpf.loader")

BPF_DIR = Path(__file__).resolve().parent
DEFAULT_BPFFS = Path("/sys/fs/bpf")
DEFAULT_PREFIX = "ambient"
STAGING = "~"  # staging directories are ~new~<pod key> and ~old~<pod key>; no pod key has a "~"
COMPILE_TIMEOUT = 120.0  # seconds the compiler process may take (bcc compiles in a few)


# --- compiling, once per process ------------------------------------------------------------------
@dataclass(frozen=True)
class _Program:
    spec: layout.ProgramSpec
    insns: bytes
    map_slots: tuple[tuple[int, str], ...]  # (instruction index, map name)
    tag: str  # the kernel's tag for this code, whatever maps it uses
    license: str
    kern_version: int

    def uses(self) -> frozenset[str]:
        return frozenset(name for _, name in self.map_slots)


@dataclass(frozen=True)
class _Compiled:
    programs: dict[str, _Program]
    maps: dict[str, objects.MapInfo]


_compile_lock = threading.Lock()
_compiled: _Compiled | None = None


def compiled() -> _Compiled:
    """The programs, compiled by bcc in a child process (`bpf.compiler`) and loaded there once as a check
    (which also gives their tags)."""
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = _compile()
        return _compiled


def _compile() -> _Compiled:
    """Runs `bpf.compiler` on `BPF_DIR` and reads what it printed: LLVM lives only in that child."""
    argv = [sys.executable, "-m", "bpf.compiler", "--source-dir", str(BPF_DIR)]
    root = str(Path(__file__).resolve().parents[1])  # where this `bpf` package is, whatever the child's cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=COMPILE_TIMEOUT, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EbpfUnavailable(f"the eBPF compiler process could not run ({exc})") from exc
    try:
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise EbpfUnavailable(f"the eBPF compiler process exited {done.returncode} without a result") from exc
    if "error" in out:
        raise EbpfUnavailable(out["error"]) if out.get("unavailable") else BpfError(out["error"])
    specs = {spec.name: spec for spec in layout.PROGRAMS}
    programs = {name: _Program(specs[name], bytes.fromhex(p["insns"]),
                               tuple((int(i), str(m)) for i, m in p["map_slots"]), p["tag"], p["license"],
                               int(p["kern_version"]))
                for name, p in out["programs"].items()}
    maps = {name: objects.MapInfo(**info) for name, info in out["maps"].items()}
    return _Compiled(programs, maps)


def _load_copy(program: _Program, map_fds: dict[str, int]) -> int:
    """Loads the program with its map references pointed at `map_fds`; returns the program fd."""
    code = bytearray(program.insns)
    for index, name in program.map_slots:
        code[8 * index + 4: 8 * index + 8] = map_fds[name].to_bytes(4, sys.byteorder, signed=True)
    spec = program.spec
    return objects.prog_load(spec.prog_type, spec.name, code, program.license, kern_version=program.kern_version,
                             expected_attach_type=spec.attach_type)


# --- the loader -------------------------------------------------------------------------------------
class Loader:
    """Attaches, adopts, inspects and detaches the redirect programs of pods.

    `bpffs` is a mounted BPF file system (mounted there if it is not, when `mount_bpffs`), `prefix`
    the directory in it that this agent owns.  Safe to call from several threads."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, bpffs: Path | str = DEFAULT_BPFFS,
                 mount_bpffs: bool = True) -> None:
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"bad pin prefix {prefix!r}: one directory name, without '.' (bpffs refuses dots)")
        self.bpffs = Path(bpffs)
        self.root = self.bpffs / prefix
        self._mount = mount_bpffs
        self._lock = threading.RLock()
        self._conn_maps: dict[int, int] = {}  # netns inode -> fd of that pod's orig_by_conn
        self._pod_netns: dict[str, int] = {}  # pod id -> netns inode

    # -- checks
    def probe(self) -> None:
        """Checks that this machine can redirect with eBPF, compiling the programs (once per process).
        Raises EbpfUnavailable naming what is missing."""
        if not cgroup2_mounted():
            raise EbpfUnavailable("no cgroup v2 file system is mounted (mount -t cgroup2 none "
                                  "/sys/fs/cgroup/unified, or boot with the unified hierarchy)")
        self._ensure_bpffs()
        compiled()

    def _ensure_bpffs(self) -> None:
        path = str(self.bpffs)
        try:
            magic = objects.fs_magic(path)
        except FileNotFoundError as exc:
            raise EbpfUnavailable(f"{path} does not exist, so there is nowhere to pin programs") from exc
        if magic != objects.BPFFS_MAGIC:
            if not self._mount:
                raise EbpfUnavailable(f"no BPF file system is mounted at {path} (mount -t bpf bpf {path})")
            try:
                objects.mount_bpffs(path)
            except BpfCallError as exc:
                raise EbpfUnavailable(f"no BPF file system is mounted at {path}, and mounting one failed: {exc}") from exc
            log.info("mounted a BPF file system at %s", path)
        self.root.mkdir(exist_ok=True)

    # -- attaching
    def attach_pod(self, pod_id: str, netns_path: str, cgroup_path: str, inbound_listener: socket.socket,
                   *, pod_ip: str | None = None, skip_inbound_ports: Iterable[int] = (),
                   dns_capture: bool = False) -> Outcome:
        """Captures the pod's TCP: outbound connect()s of the processes in `cgroup_path` go to 15001
        (to `pod_ip`:15001, or 127.0.0.1:15001 without it), inbound connections to the pod's addresses
        go to `inbound_listener` (the agent's 15006, in the pod's namespace), but for the agent's
        ports and `skip_inbound_ports`.  Give `pod_ip`: the agent then sees the app's pod IP as the
        peer of a captured connection, as with iptables, and the app's connections to its own
        address stay direct, as with iptables.  With `dns_capture`, its UDP and TCP to port 53 go to the
        agent's DNS proxy (127.0.0.1:15053 in the pod).  Raises PodTargetError for bad input (nothing
        touched) and AttachError when the kernel refuses (nothing new left attached)."""
        settings = Settings.of(pod_ip, skip_inbound_ports, dns_capture)
        self.probe()
        with self._lock:
            target = Target(netns_path, cgroup_path)
            try:
                check_listener(inbound_listener, target.netns_ino)
                found = self.inspect_pod(pod_id)
                if found.exact and (found.cgroup_id, found.netns_ino) == (target.cgroup_id, target.netns_ino):
                    self._adopt(pod_id, target, inbound_listener, settings)
                    return Outcome.ADOPTED
                if found.present:
                    log.info("pod %s: replacing what is pinned at %s (%s)", pod_id, found.pin_dir,
                             "; ".join(found.problems) or "other cgroup or namespace")
                self._install(pod_id, target, inbound_listener, settings)
                return Outcome.REDONE if found.present else Outcome.INSTALLED
            finally:
                target.close()

    def _install(self, pod_id: str, target: Target, listener: socket.socket, settings: Settings) -> None:
        program_set, key = compiled(), layout.pod_key(pod_id)
        staging, final = self.root / f"{STAGING}new{STAGING}{key}", self.root / key
        remove_pins(staging)
        fds: list[int] = []
        try:
            maps = {name: keep(fds, objects.map_create(spec)) for name, spec in program_set.maps.items()}
            write_settings(maps, listener, settings)
            progs = {name: keep(fds, _load_copy(p, maps)) for name, p in program_set.programs.items()}
            links = {spec.name: keep(fds, objects.link_create(progs[spec.name], target.fd_for(spec.target),
                                                                spec.attach_type, f"{spec.name} to pod {pod_id}"))
                     for spec in layout.PROGRAMS}
            staging.mkdir()
            for name, fd in maps.items():
                objects.pin(fd, str(staging / layout.map_pin_name(name)))
            for spec in layout.PROGRAMS:
                objects.pin(links[spec.name], str(staging / spec.pin_name))
            self._swap(staging, final)
            self._remember(pod_id, target.netns_ino, os.dup(maps[layout.MAP_ORIG_BY_CONN]))
        except BaseException as exc:
            remove_pins(staging)
            if isinstance(exc, BpfCallError | OSError):
                raise AttachError(f"attaching the redirect programs of pod {pod_id} failed: {exc}; "
                                  "nothing new was left attached") from exc
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _swap(self, staging: Path, final: Path) -> None:
        old = self.root / f"{STAGING}old{STAGING}{final.name}"
        remove_pins(old)
        if final.exists():
            os.rename(final, old)
        os.rename(staging, final)
        remove_pins(old)

    def _adopt(self, pod_id: str, target: Target, listener: socket.socket, settings: Settings) -> None:
        d = layout.pod_dir(self.root, pod_id)
        fds: list[int] = []
        try:
            maps = {name: keep(fds, objects.get_pinned(str(d / layout.map_pin_name(name)))) for name in layout.MAPS}
            write_settings(maps, listener, settings)
            self._remember(pod_id, target.netns_ino, os.dup(maps[layout.MAP_ORIG_BY_CONN]))
        except BpfCallError as exc:
            raise AttachError(f"adopting the pinned redirect programs of pod {pod_id} failed: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)

    def _remember(self, pod_id: str, netns_ino: int, conn_fd: int) -> None:
        self._forget(pod_id)
        self._pod_netns[pod_id] = netns_ino
        self._conn_maps[netns_ino] = conn_fd

    def _forget(self, pod_id: str) -> None:
        ino = self._pod_netns.pop(pod_id, None)
        if ino is not None and (fd := self._conn_maps.pop(ino, None)) is not None:
            os.close(fd)

    # -- detaching, listing, inspecting
    def detach_pod(self, pod_id: str) -> bool:
        """Detaches and unpins everything of the pod; False when nothing was pinned."""
        with self._lock:
            self._forget(pod_id)
            key = layout.pod_key(pod_id)
            for stale in (f"{STAGING}new{STAGING}{key}", f"{STAGING}old{STAGING}{key}"):
                remove_pins(self.root / stale)
            return remove_pins(self.root / key)

    def list_pods(self) -> list[str]:
        """The pods that have a pin directory."""
        try:
            names = [p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(STAGING)]
        except FileNotFoundError:
            return []
        return sorted(layout.pod_id_of(n) for n in names)

    def inspect_pod(self, pod_id: str) -> PodPrograms:
        """What is pinned for the pod, and every way in which it differs from what this build pins."""
        d = layout.pod_dir(self.root, pod_id)
        try:
            present = set(os.listdir(d))
        except FileNotFoundError:
            return PodPrograms(pod_id, d)
        program_set = compiled()
        problems = [f"unexpected pin {n}" for n in sorted(present - layout.pin_names())]
        maps: list[MapState] = []
        cookie = 0
        for name in layout.MAPS:
            pin = layout.map_pin_name(name)
            if pin not in present:
                problems.append(f"map {name} is not pinned")
                continue
            try:
                fd = objects.get_pinned(str(d / pin))
            except BpfCallError as exc:
                problems.append(f"map {name}: {exc}")
                continue
            try:
                info = objects.map_info(fd)
                if shape(info) != shape(program_set.maps[name]):
                    problems.append(f"map {name} has another type or size than this build's")
                entries = count_entries(fd, info)
                if name == layout.MAP_INBOUND_SOCK and entries:
                    cookie = listener_cookie(fd)
                maps.append(MapState(name, info.id, info.max_entries, entries))
            finally:
                os.close(fd)
        map_ids = {m.name: m.map_id for m in maps}
        links = [self._inspect_link(d, spec, present, program_set, map_ids, problems) for spec in layout.PROGRAMS]
        states = tuple(s for s in links if s is not None)
        if len({s.cgroup_id for s in states if s.cgroup_id}) > 1:
            problems.append("the cgroup links are attached to different cgroups")
        return PodPrograms(pod_id, d, states, tuple(maps), tuple(problems), cookie)

    @staticmethod
    def _inspect_link(d: Path, spec: layout.ProgramSpec, present: set[str], program_set: _Compiled,
                      map_ids: dict[str, int], problems: list[str]) -> LinkState | None:
        if spec.pin_name not in present:
            problems.append(f"{spec.name} has no pinned link")
            return None
        try:
            fd = objects.get_pinned(str(d / spec.pin_name))
            try:
                link = objects.link_info(fd)
            finally:
                os.close(fd)
            pfd = objects.prog_fd_by_id(link.prog_id)
            try:
                prog = objects.prog_info(pfd)
            finally:
                os.close(pfd)
        except BpfCallError as exc:
            problems.append(f"{spec.name}: {exc}")
            return None
        ours = program_set.programs[spec.name]
        if prog.tag != ours.tag or prog.name != spec.name[:15]:
            problems.append(f"{spec.name}: the attached program (tag {prog.tag}) is not this build's ({ours.tag})")
        if link.attach_type != spec.attach_type:
            problems.append(f"{spec.name}: attached as type {link.attach_type}, not {spec.attach_type}")
        if not (link.cgroup_id if spec.target is layout.Target.CGROUP else link.netns_ino):
            problems.append(f"{spec.name}: detached (its {spec.target.value} is gone)")
        if set(prog.map_ids) != {map_ids.get(name, -1) for name in ours.uses()}:
            problems.append(f"{spec.name}: uses other maps than the pinned ones")
        return LinkState(spec.name, link.id, link.prog_id, prog.tag, link.attach_type, link.cgroup_id, link.netns_ino)

    # -- the agent's side
    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        """Where a connection accepted on a pod's 15001 was going (and forgets the record): the eBPF
        counterpart of SO_ORIGINAL_DST.  The pod is the one attached or adopted by this loader in the
        socket's network namespace, else the one pinned for that namespace (`_pinned_conn_map`)."""
        peer, local = sock.getpeername(), sock.getsockname()
        key = layout.ConnKey(app_ip4=layout.be32(ip4_address(peer[0])), proxy_ip4=layout.be32(ip4_address(local[0])),
                             app_port=layout.be16(peer[1]), proxy_port=layout.be16(local[1]))
        orig = layout.OrigDst()
        netns_ino = objects.socket_netns_ino(sock)
        with self._lock:  # so that a detach cannot close the fd under the lookup
            fd = self._conn_maps.get(netns_ino)
            if fd is None:
                fd = self._pinned_conn_map(netns_ino)
            if fd is None:
                raise NoOriginalDestination("the socket is not in the network namespace of any pod this agent "
                                            "attached or adopted")
            found = objects.map_take(fd, key, orig)
        if not found:
            raise NoOriginalDestination(f"no redirect record for {peer[0]}:{peer[1]} -> {local[0]}:{local[1]}: "
                                        "the connection was not redirected by the pod's connect hook")
        return layout.ip4_of(orig.ip4), layout.port_of(orig.port)

    def _pinned_conn_map(self, netns_ino: int) -> int | None:
        """The redirect records of the pod whose pinned sk_lookup link is in network namespace `netns_ino`,
        for a pod this loader has not attached or adopted yet: an agent that takes a node over from another
        takes connections on its new listeners (they share the old agent's ports) a moment before it has
        adopted what is pinned.  None when no pod's is.  Called with the lock held."""
        link = next(spec.pin_name for spec in layout.PROGRAMS if spec.target is layout.Target.NETNS)
        for pod_id in self.list_pods():
            d = layout.pod_dir(self.root, pod_id)
            try:
                fd = objects.get_pinned(str(d / link))
                try:
                    if objects.link_info(fd).netns_ino != netns_ino:
                        continue
                finally:
                    os.close(fd)
                conn_fd = objects.get_pinned(str(d / layout.map_pin_name(layout.MAP_ORIG_BY_CONN)))
            except BpfCallError:
                continue
            self._remember(pod_id, netns_ino, conn_fd)
            return conn_fd
        return None

    def close(self) -> None:
        """Closes this process's handles; what is pinned stays attached."""
        with self._lock:
            for pod_id in list(self._pod_netns):
                self._forget(pod_id)


