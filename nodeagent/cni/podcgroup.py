"""Where a pod's cgroup v2 directory is (eBPF capture attaches to it), before its containers start.

The kubelet makes a pod's cgroup before it asks the runtime for the sandbox, so the plugin can find it by
the pod's uid: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice` with the
systemd cgroup driver, `kubepods/<qos>/pod<uid>` with cgroupfs (Guaranteed pods sit one level higher).
A node that lays pods out otherwise says where with a format (`cgroupFormat` in the plugin's config).

Standard library only: the plugin runs with the node's own Python (see `nodeagent.cni`).
"""

from __future__ import annotations

import os

# Where cgroup v2 is mounted: alone, or beside v1 in the hybrid layout.
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
KUBEPODS = ("kubepods.slice", "kubepods")


def pod_dir_names(uid: str) -> tuple[str, ...]:
    """The names a kubelet gives the cgroup of the pod `uid` (cgroupfs, systemd)."""
    return (f"pod{uid}", f"pod{uid.replace('-', '_')}.slice")


def matches(name: str, uid: str) -> bool:
    cgroupfs, systemd = pod_dir_names(uid)
    return name == cgroupfs or name.endswith("-" + systemd)


def find(uid: str, *, fmt: str = "", namespace: str = "", name: str = "",
         roots: tuple[str, ...] = CGROUP_ROOTS) -> str:
    """The pod's cgroup directory, or "" when it cannot be found (then eBPF capture cannot be used for it;
    iptables capture does not need it)."""
    if fmt:
        path = fmt.format(namespace=namespace, name=name, uid=uid)
        return path if os.path.isdir(path) else ""
    if not uid:
        return ""
    for root in roots:
        for top in KUBEPODS:
            base = os.path.join(root, top)
            for parent in (base, *_subdirs(base)):  # Guaranteed pods, then each QoS class
                for entry in _subdirs(parent):
                    if matches(os.path.basename(entry), uid):
                        return entry
    return ""


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []
