"""The local cluster's DaemonSet and Deployment as Kubernetes shows them (`meshctl get ds,deploy`).

The cluster record keeps each workload it runs from `daemonset/` (the manifest as it was run, and its pods:
name, node, address, namespace, process, readiness probe; `localcluster.components`).  An object is built
from that record, each pod's process liveness and one run of its readiness probe, as the kubelet's last
report would show it:

    DaemonSet    status.desiredNumberScheduled   the nodes it should run on (every node of the cluster)
                 status.currentNumberScheduled   pods whose process is running
                 status.numberReady              ... and whose readiness probe passes now
    Deployment   status.replicas                 pods whose process is running
                 status.readyReplicas            ... and ready; availableReplicas the same (minReadySeconds 0)

A pod without a readiness probe is ready while it runs.  Probing enters the cluster's namespaces (root).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localcluster import processes, state
from localcluster.kubelet import Probe
from localcluster.processes import ProcessRecord
from mesh.errors import MeshError
from mesh.netns import NetnsError
from mesh.serve import client
from mesh.serve.errors import HttpClientError

KINDS = {"daemonset": "DaemonSet", "daemonsets": "DaemonSet", "ds": "DaemonSet",
         "deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment"}
API_VERSION = "apps/v1"


class WorkloadError(MeshError):
    pass


def resolve_kind(text: str) -> str | None:
    """DaemonSet or Deployment for one of their names (kubectl's: singular, plural, short, kind.apps)."""
    return KINDS.get(text.lower().removesuffix(".apps"))


@dataclass(frozen=True)
class PodState:
    running: bool
    ready: bool


# ---- probing -------------------------------------------------------------------------------------------------


def probe_ready(p: Probe, netns: str, ip: str) -> bool:
    """One run of a readiness probe against the pod's address (`p.host` when set), from inside `netns`."""
    endpoint = client.Endpoint.tcp(p.host or ip, p.port, netns=netns or None)
    try:
        if p.kind == "tcp":
            endpoint.connect(p.timeout).close()
            return True
        reply = client.get(endpoint, p.path, timeout=p.timeout)
    except (OSError, HttpClientError):
        return False
    except NetnsError as exc:
        if os.geteuid() != 0:
            raise WorkloadError(f"cannot probe {endpoint}: {exc}: probing enters the cluster's namespaces, "
                                "run it as root") from None
        return False  # the namespace is gone: the pod is not there to be ready
    return 200 <= reply.status < 400


def pod_states(record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, PodState]:
    """Each pod of a workload entry: its process running, and its readiness probe passing."""
    procs = {p["name"]: ProcessRecord.from_json(p) for p in record.get("processes", [])}
    out: dict[str, PodState] = {}
    for pod in entry["pods"]:
        rec = procs.get(pod["process"])
        running = rec is not None and processes.is_running(rec)
        probe = Probe(**pod["readiness"]) if pod.get("readiness") else None
        ready = running and (probe is None or probe_ready(probe, pod["netns"], pod["ip"]))
        out[pod["name"]] = PodState(running, ready)
    return out


# ---- objects -------------------------------------------------------------------------------------------------


def workload_object(entry: Mapping[str, Any], states: Mapping[str, PodState], created: str = "") -> dict[str, Any]:
    """The Kubernetes object of a workload entry of the record, with its status from `states`."""
    manifest = entry["manifest"]
    source = manifest["metadata"]
    meta: dict[str, Any] = {"name": entry["name"], "namespace": entry["namespace"],
                            "uid": f"{entry['namespace']}.{entry['name']}", "generation": 1}
    if created:
        meta["creationTimestamp"] = created
    meta.update({k: source[k] for k in ("labels", "annotations") if k in source})
    running = sum(1 for p in entry["pods"] if states[p["name"]].running)
    ready = sum(1 for p in entry["pods"] if states[p["name"]].ready)
    status: dict[str, Any]
    if entry["kind"] == "DaemonSet":
        desired = len(entry["pods"])
        status = {"currentNumberScheduled": running, "desiredNumberScheduled": desired, "numberMisscheduled": 0,
                  "numberReady": ready, "numberAvailable": ready, "updatedNumberScheduled": running,
                  "observedGeneration": 1}
        if desired - ready:
            status["numberUnavailable"] = desired - ready
    else:
        desired = int(manifest.get("spec", {}).get("replicas", 1))
        status = {"observedGeneration": 1, "replicas": running, "updatedReplicas": running,
                  "readyReplicas": ready, "availableReplicas": ready,
                  "conditions": [{"type": "Available", "status": "True" if ready >= desired else "False",
                                  "reason": "MinimumReplicasAvailable" if ready >= desired
                                  else "MinimumReplicasUnavailable"}]}
        if desired - ready > 0:
            status["unavailableReplicas"] = desired - ready
    return {"apiVersion": API_VERSION, "kind": entry["kind"], "metadata": meta,
            "spec": manifest.get("spec", {}), "status": status}


def get(cluster: str, kind: str, namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """The cluster's workloads of `kind` (in `namespace`, or all; only `name`), Kubernetes-shaped."""
    record = state.read_record(cluster)
    entries = [e for e in record.get("workloads", []) if e["kind"] == kind
               and (namespace is None or e["namespace"] == namespace) and (name is None or e["name"] == name)]
    if name is not None and not entries:
        where = f" in namespace {namespace}" if namespace else ""
        raise WorkloadError(f"{kind.lower()} {name!r} not found{where} in cluster {cluster!r}")
    created = str(record.get("started", "")).replace("+00:00", "Z")
    return [workload_object(e, pod_states(record, e), created) for e in entries]
