"""Which log file `meshctl logs TARGET` means, and which of its lines to show.

Every process of a local cluster appends its output to one file, named in the cluster record (its
`processes`: `log`).  A target is, as kubectl and istioctl users write it:

    nodeagent/NODE          the node agent of NODE (`nodeagent` alone when the cluster has one node)
    controlplane            the control plane (istiod's Deployment)
    controller              the local cluster's waypoint controller
    prometheus              the cluster's Prometheus
    ds/NAME, deploy/NAME    a pod of the DaemonSet or Deployment NAME in -n NAMESPACE (`kubectl logs ds/ztunnel`);
                            daemonset/ and deployment/ too
    POD                     a pod in -n NAMESPACE: an application pod, a waypoint (named as its Gateway), or
                            a pod of the mesh's own workloads (`meshctl get pods -n istio-system` lists none;
                            `meshctl get ds -A -o json` does)

`select` (pure) keeps the lines a `--since` and `--tail` ask for; the time of a line is the one the mesh's
log format starts with (`mesh.logs`); a line without one (a traceback, an application's output) goes with
the line before it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster.workloads import KINDS as WORKLOAD_KINDS
from mesh import logs
from mesh.errors import MeshError

NODE_AGENT = "nodeagent"
COMPONENTS = {"controlplane": "the control plane", "controller": "the waypoint controller",
              "prometheus": "Prometheus"}


class LogTargetError(MeshError):
    pass


@dataclass(frozen=True)
class LogSource:
    what: str  # "the node agent of node-1", "pod bookinfo/productpage-v1-0"
    path: Path
    note: str = ""  # said on stderr first, e.g. which of a DaemonSet's pods is shown


def find(record: dict[str, Any], target: str, namespace: str) -> LogSource:
    """The log of `target` (see the module docstring) in the cluster whose record is `record`."""
    procs = {p["name"]: p for p in record.get("processes", [])}
    cluster = record.get("name", "?")
    kind, sep, name = target.partition("/")
    if not target or (sep and not name):
        raise LogTargetError(f"{target!r}: name a component (nodeagent/NODE, controlplane, controller) or a pod")
    if kind == NODE_AGENT:
        nodes = [n["name"] for n in record.get("plan", {}).get("nodes", [])]
        if not sep:
            if len(nodes) != 1:
                raise LogTargetError(f"cluster {cluster!r} has {len(nodes)} node agents: say which, one of "
                                     + ", ".join(f"nodeagent/{n}" for n in nodes))
            name = nodes[0]
        if name not in nodes:
            raise LogTargetError(f"cluster {cluster!r} has no node {name!r} (nodes: {', '.join(nodes) or 'none'})")
        return _source(procs, f"nodeagent {name}", f"the node agent of {name}")
    if not sep and target in COMPONENTS:
        return _source(procs, target, COMPONENTS[target])
    if sep and kind.lower() in WORKLOAD_KINDS:
        return _workload(record, procs, WORKLOAD_KINDS[kind.lower()], namespace, name)
    if sep:
        raise LogTargetError(f"{target!r}: unknown kind {kind!r}: write nodeagent/NODE, ds/NAME or deploy/NAME")
    return _pod(record, procs, namespace, target)


def _source(procs: dict[str, Any], process: str, what: str, note: str = "") -> LogSource:
    if process not in procs:
        raise LogTargetError(f"{what} has no process in this cluster (`meshctl cluster status` lists them)")
    return LogSource(what, Path(procs[process]["log"]), note)


def _workload(record: dict[str, Any], procs: dict[str, Any], kind: str, namespace: str, name: str) -> LogSource:
    found = [w for w in record.get("workloads", []) if w["kind"] == kind and w["name"] == name]
    here = [w for w in found if w["namespace"] == namespace]
    if not here and len(found) == 1:  # the mesh's own workloads live in istio-system: no need to say so
        here = found
    if not here:
        have = ", ".join(f"{w['namespace']}/{w['name']}" for w in record.get("workloads", []) if w["kind"] == kind)
        raise LogTargetError(f"no {kind} {name!r} in namespace {namespace!r} ({kind}s: {have or 'none'})")
    pods = here[0].get("pods", [])
    if not pods:
        raise LogTargetError(f"{kind} {here[0]['namespace']}/{name} has no pods")
    note = f"Found {len(pods)} pods, using pod/{pods[0]['name']}" if len(pods) > 1 else ""
    return _source(procs, pods[0]["process"], f"pod {here[0]['namespace']}/{pods[0]['name']}", note)


def _pod(record: dict[str, Any], procs: dict[str, Any], namespace: str, name: str) -> LogSource:
    for pod in record.get("plan", {}).get("pods", []):
        if (pod["namespace"], pod["name"]) == (namespace, name):
            kind = "waypoint" if pod.get("waypoint") else "pod"
            return _source(procs, f"{kind} {namespace}/{name}", f"{kind} {namespace}/{name}")
    for w in record.get("workloads", []):
        for pod in w.get("pods", []):
            if (w["namespace"], pod["name"]) == (namespace, name):
                return _source(procs, pod["process"], f"pod {namespace}/{name}")
    here = [p["name"] for p in record.get("plan", {}).get("pods", []) if p["namespace"] == namespace]
    raise LogTargetError(f"no pod {name!r} in namespace {namespace!r} (pods there: {', '.join(here) or 'none'}); "
                         "the mesh's own logs: nodeagent/NODE, controlplane, controller")


def select(data: bytes, *, tail: int | None = None, since: datetime.datetime | None = None) -> bytes:
    """The lines of `data` written at or after `since` (see the module docstring), then the last `tail`."""
    lines = data.splitlines(keepends=True)
    if since is not None:
        kept, keep = [], False
        for line in lines:
            t = logs.line_time(line)
            if t is not None:
                keep = t >= since
            if keep:
                kept.append(line)
        lines = kept
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    out = b"".join(lines)
    return out if not out or out.endswith(b"\n") else out + b"\n"
