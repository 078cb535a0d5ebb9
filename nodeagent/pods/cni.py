"""Pods as the CNI plugin hands them over: the agent holds each pod's network namespace by descriptor.

The plugin (`nodeagent.cni.plugin`) passes a new pod's namespace and who the pod is; discovery says whether
it is in the mesh.  `desired` is the handed-over pods whose workload discovery marks for the mesh (HBONE,
not a waypoint), `on_node` all handed-over pods.  A pod's `PodRef.netns` is a symbolic link to
`/proc/<agent pid>/fd/<n>` in a temporary directory private to this run of the agent: the agent's helpers
take paths, and a link (named after the pod, its namespace's inode and a serial number) is never reused,
as a bare descriptor number would be once closed, so nothing keyed by the path (the HBONE pool's origin)
outlives its pod.

What survives an agent restart (the plugin is not called again for pods that already run):

- the record, `<state dir>/cni/pods.json`: every handed-over pod with the path the runtime gave its
  namespace (`/var/run/netns/cni-...`, which the agent sees at the same path) and its inode.  At start each
  is opened again by path; one whose path is gone or now holds another namespace is dropped.
- a scan, for the pods of this node that discovery knows and the record does not (running before the
  plugin was installed, or the agent has no state directory): their namespaces are found by address
  (`scan.py`), at start and then every `SCAN_INTERVAL` while some are missing.

A handed-over pod is let go on the plugin's DEL, or when discovery, having known it, no longer does.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh import defaults, files, netns
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.cni import podcgroup
from nodeagent.cni.protocol import DNS_CAPTURE_ANNOTATION, PodInfo
from nodeagent.errors import NodeAgentError
from nodeagent.pods import scan
from nodeagent.pods.source import PodRef
from nodeagent.proxy.routing import workload_identity
from nodeagent.state import MeshState

log = logging.getLogger("nodeagent.pods.cni")

STATE_SUBDIR = "cni"
RECORD_FILE = "pods.json"
SCAN_INTERVAL = 30.0  # seconds between scans while some of the node's pods have no namespace

# What discovery says of a handed-over pod.
IN_MESH, NOT_IN_MESH, UNKNOWN = "in-mesh", "not-in-mesh", "unknown"
NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3), the CLONE_NEW* type of a namespace descriptor


class HandoverError(NodeAgentError):
    """What the plugin handed over cannot be used."""


@dataclass
class Handover:
    pod: PodInfo  # as the plugin (or the record, or a scan) said
    fd: int  # the pod's network namespace, held open
    ino: int  # its inode: the same namespace, whatever path it comes by
    link: str  # the path the agent's helpers use: a link to /proc/<pid>/fd/<fd>
    seen: bool = False  # discovery has known the pod, so its disappearance means the pod is gone

    @property
    def key(self) -> str:
        return handover_key(self.pod)

    @property
    def ip(self) -> str:
        return next((ip for ip in self.pod.ips if ":" not in ip), self.pod.ips[0] if self.pod.ips else "")


def dns_capture_of(pod: PodInfo) -> tuple[bool | None, str]:
    """The pod's `ambient.istio.io/dns-capture` annotation: True, False or None (unset, or a value that is
    neither true nor false), and what is wrong with the value, if anything."""
    value = pod.annotation(DNS_CAPTURE_ANNOTATION)
    if value is None:
        return None, ""
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true", ""
    return None, (f"pod {pod.key}: annotation {DNS_CAPTURE_ANNOTATION}={value!r} is neither \"true\" nor "
                  "\"false\"; the agent's default DNS capture applies")


def handover_key(pod: PodInfo) -> str:
    return pod.uid or pod.key


def in_mesh(w: pb.Workload) -> bool:
    """Discovery's word on a pod (its address comes from the plugin: discovery may not have it yet)."""
    return w.tunnel_protocol == pb.HBONE and not w.is_waypoint


def namespace_inode(fd: int) -> int:
    """The inode of the network namespace `fd` refers to (opened by /proc/<pid>/ns/net or a pinned file
    alike); HandoverError when it is no network namespace."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        raise HandoverError(f"what was handed over is not a network namespace ({exc.strerror})") from exc
    if kind != netns.CLONE_NEWNET:
        raise HandoverError(f"what was handed over is another kind of namespace ({kind:#x}), not a network one")
    return os.fstat(fd).st_ino


class CniPodSource:
    def __init__(self, state: MeshState, node: str, *, state_dir: Path | None = None,
                 netns_dirs: Iterable[str] = scan.NETNS_DIRS, proc: str = scan.PROC, cgroup_format: str = "",
                 trust_domain: str = defaults.TRUST_DOMAIN) -> None:
        self.state = state
        self.node = node
        self.netns_dirs = tuple(netns_dirs)
        self.proc = proc
        self.cgroup_format = cgroup_format
        self.trust_domain = trust_domain
        self.record = state_dir / STATE_SUBDIR / RECORD_FILE if state_dir else None
        # The links are this process's alone (they point into its /proc/<pid>/fd): a private directory, not
        # the state directory, which a newer agent starting beside this one (a rolling update) shares.
        self.links = Path(tempfile.mkdtemp(prefix="nodeagent-cni-"))
        self._pods: dict[str, Handover] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._serial = itertools.count(1)  # links are never reused, even for the same namespace again

    @classmethod
    def open(cls, state: MeshState, node: str, **kwargs: Any) -> CniPodSource:
        """The source, with the pods that already run: those in the record, then those found by a scan.
        Blocking (it enters namespaces): run it in a thread."""
        source = cls(state, node, **kwargs)
        restored = source.restore()
        found = source.scan()
        source.save()
        log.info('{"event": "cni pods at start", "from_record": %d, "found_running": %d}', restored, found)
        return source

    # ---- the PodSource seam -------------------------------------------------------------------------

    def desired(self) -> dict[str, PodRef]:
        out = {}
        for h in self.handovers():
            w = self.workload_of(h)
            if w is not None and in_mesh(w):
                ref = self._ref(h, w)
                if ref.ip:
                    out[ref.uid] = ref
        return out

    def on_node(self) -> list[PodRef]:
        return [self._ref(h, self.workload_of(h)) for h in self.handovers()]

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        self.state.on_change(lambda kind: callback())

    # ---- what the handover server asks ---------------------------------------------------------------

    def handovers(self) -> list[Handover]:
        with self._lock:
            return list(self._pods.values())

    def get(self, pod: PodInfo) -> Handover | None:
        with self._lock:
            return self._pods.get(handover_key(pod))

    def lookup(self, pod: PodInfo) -> tuple[str, PodRef | None]:
        """What discovery says of a handed-over pod: IN_MESH (with the PodRef to enroll), NOT_IN_MESH or
        UNKNOWN (discovery has no such pod, or the pod was not handed over)."""
        h = self.get(pod)
        w = self.workload_of(h) if h is not None else None
        if h is None or w is None:
            return UNKNOWN, None
        return (IN_MESH, self._ref(h, w)) if in_mesh(w) else (NOT_IN_MESH, None)

    def workload_of(self, h: Handover) -> pb.Workload | None:
        """The pod's workload in discovery: by uid, else by name on this node (where the pod's uid is not
        known, or the workload's uid is `<namespace>/<name>`, as in the local cluster)."""
        pod = h.pod
        w = self.state.workload(pod.uid) if pod.uid else None
        if w is None or (w.namespace, w.name) != (pod.namespace, pod.name):
            # A workload with a Kubernetes uid is that pod only: another pod of the same name (a
            # StatefulSet's, recreated) must not be taken for it.
            w = next((w for w in self.state.workloads_on(self.node)
                      if (w.namespace, w.name) == (pod.namespace, pod.name)
                      and (not pod.uid or w.uid == pod.key)), None)
        if w is not None:
            h.seen = True  # a memo for `prune`: from now on, its absence from discovery means it is gone
        return w

    def hand_over(self, pod: PodInfo, fd: int) -> tuple[Handover, Handover | None]:
        """Take the pod (and ownership of `fd`, its network namespace).  The handover now in force and the
        one it replaced, which the caller retires once enrollment has let go of it.  The same pod handed
        over again with the same namespace (a runtime's retry) keeps the first descriptor."""
        try:
            ino = namespace_inode(fd)
        except HandoverError:
            os.close(fd)
            raise
        with self._lock:
            current = self._pods.get(handover_key(pod))
            if current is not None and current.ino == ino:
                os.close(fd)
                current.pod = pod
                return current, None
            h = self._link(pod, fd, ino)
            self._pods[h.key] = h
        log.info('{"event": "handed over", "pod": "%s", "ips": "%s", "netns": "%s", "cgroup": "%s"}',
                 pod.key, ",".join(pod.ips), pod.netns, pod.cgroup)
        problem = dns_capture_of(pod)[1]
        if problem:
            log.warning("%s", problem)
        self._notify()
        return h, current

    def take(self, pod: PodInfo) -> Handover | None:
        """The pod is gone (the plugin's DEL): stop holding it.  None when it was not held, or was handed
        over again since with another sandbox (a late DEL of the old one)."""
        with self._lock:
            h = self._pods.get(handover_key(pod))
            if h is None or (pod.container_id and h.pod.container_id and pod.container_id != h.pod.container_id):
                return None
            del self._pods[h.key]
        log.info('{"event": "let go", "pod": "%s"}', pod.key)
        self._notify()
        return h

    def retire(self, h: Handover) -> None:
        """Close what a handover held, once enrollment no longer uses its path."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(h.link)
        with contextlib.suppress(OSError):
            os.close(h.fd)

    def close(self) -> None:
        with self._lock:
            pods, self._pods = list(self._pods.values()), {}
        for h in pods:
            self.retire(h)
        shutil.rmtree(self.links, ignore_errors=True)

    # ---- what outlives the agent ---------------------------------------------------------------------

    def save(self) -> None:
        """Write the record (from any thread; writes happen in the order of the states they show)."""
        if self.record is None:
            return
        with self._save_lock:
            entries = [{"pod": h.pod.to_json(), "ino": h.ino} for h in self.handovers()]
            files.write_atomic(self.record, json.dumps(entries, indent=1).encode(), mode=0o600)

    def restore(self) -> int:
        """Open again the namespaces of the pods in the record; how many were."""
        if self.record is None or not self.record.exists():
            return 0
        try:
            entries = json.loads(self.record.read_text())
            records = [(PodInfo.from_json(e["pod"]), int(e["ino"])) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the record of handed-over pods %s: %s", self.record, exc)
            return 0
        restored = 0
        for pod, ino in records:
            if self._adopt(pod, pod.netns, ino):
                restored += 1
            else:
                log.info('{"event": "gone while the agent was away", "pod": "%s"}', pod.key)
        return restored

    def missing(self, *, in_mesh_only: bool = False) -> list[pb.Workload]:
        """This node's pods that discovery knows, with an address, and no handover."""
        held = {(h.pod.namespace, h.pod.name) for h in self.handovers()}
        return [w for w in self.state.workloads_on(self.node)
                if not w.is_waypoint and w.addresses and (w.namespace, w.name) not in held
                and (in_mesh(w) or not in_mesh_only)]

    def scan(self) -> int:
        """Find the namespaces of `missing` pods by their addresses; how many were found."""
        wanted = {w.addresses[0]: w for w in self.missing()}
        if not wanted:
            return 0
        found = 0
        for ip, ns in scan.find(wanted, self.netns_dirs, self.proc).items():
            w = wanted[ip]
            cgroup = scan.cgroup_of(ns.pid, self.proc) if ns.pid else ""
            cgroup = cgroup or podcgroup.find(w.uid, fmt=self.cgroup_format, namespace=w.namespace, name=w.name)
            pod = PodInfo(namespace=w.namespace, name=w.name, uid=w.uid, ips=(ip,), netns=ns.path, cgroup=cgroup)
            if self._adopt(pod, ns.path, ns.ino):
                log.info('{"event": "found running", "pod": "%s", "ip": "%s", "netns": "%s"}', pod.key, ip, ns.path)
                found += 1
        return found

    def prune(self) -> list[Handover]:
        """Let go of pods discovery has known and no longer does (a DEL that never reached the agent);
        the caller retires them once enrollment has let go."""
        gone = []
        with self._lock:
            for h in list(self._pods.values()):
                if self.workload_of(h) is None and h.seen:
                    gone.append(self._pods.pop(h.key))
        for h in gone:
            log.info('{"event": "let go", "pod": "%s", "why": "discovery no longer knows it"}', h.pod.key)
        if gone:
            self._notify()
        return gone

    # ---- inside --------------------------------------------------------------------------------------

    def _adopt(self, pod: PodInfo, path: str, ino: int) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if namespace_inode(fd) != ino:
                raise HandoverError(f"{path} holds another network namespace now")
        except HandoverError:
            os.close(fd)
            return False
        with self._lock:
            if handover_key(pod) in self._pods:
                os.close(fd)
                return False
            h = self._link(pod, fd, ino)
            self._pods[h.key] = h
        self._notify()
        return True

    def _link(self, pod: PodInfo, fd: int, ino: int) -> Handover:
        link = self.links / f"{pod.namespace}_{pod.name}_{ino}.{next(self._serial)}"
        link.symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
        return Handover(pod, fd, ino, str(link))

    def _ref(self, h: Handover, w: pb.Workload | None) -> PodRef:
        if w is None:  # not in discovery: enough to find and clean the pod, never to enroll it
            identity = SpiffeId(self.trust_domain, h.pod.namespace, "default")
            return PodRef(h.key, h.pod.namespace, h.pod.name, h.ip, identity, h.link, h.pod.cgroup,
                          dns_capture_of(h.pod)[0])
        return PodRef(w.uid, w.namespace, w.name, h.ip or (w.addresses[0] if w.addresses else ""),
                      workload_identity(w), h.link, h.pod.cgroup, dns_capture_of(h.pod)[0])

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            callback()
