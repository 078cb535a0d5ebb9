"""What the local cluster tells the control plane: its namespaces, service accounts, pods and services,
as Kubernetes would report them (pods with their node, services with a clusterIP).

A pod's address is reported as the kubelet reports it, once its sandbox is wired (the CNI result): `up`
registers every object first with its pods `Pending` and without `status.podIP` (`cluster_objects(...,
wired=False)`), then, once every pod's CNI ADD is done, the pods again with their addresses (`wired_pods`).
So the node agents never know a pod's address before the pod has it: an agent looking for the namespace of a
pod it knows by address (`nodeagent.pods.scan`) cannot take another cluster's pod of the same address for
it while the pod is still being made.
"""

from __future__ import annotations

import copy
from typing import Any

from localcluster.plan import ClusterPlan, PodPlan
from localcluster.spec import ClusterSpec


def cluster_objects(spec: ClusterSpec, plan: ClusterPlan, *, wired: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pods = {p.key: p for p in plan.pods}
    services = {s.key: s for s in plan.services}
    for doc in spec.documents:
        body = copy.deepcopy(doc)
        meta = body.setdefault("metadata", {})
        kind = body.get("kind")
        if kind in ("Pod", "Service", "ServiceAccount"):
            meta.setdefault("namespace", "default")
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if kind == "Pod":
            pod = pods[key]
            for container in body.get("spec", {}).get("containers", []):
                container.setdefault("name", pod.spec.container_name)
            body["status"] = pod_status(plan, pod, wired=wired)
        elif kind == "Service":
            body.setdefault("spec", {})["clusterIP"] = str(services[key].cluster_ip)
        out.append(body)
    return out


def wired_pods(spec: ClusterSpec, plan: ClusterPlan) -> list[dict[str, Any]]:
    """The cluster's pods once their sandboxes are wired: running, with their addresses."""
    return [body for body in cluster_objects(spec, plan) if body.get("kind") == "Pod"]


def pod_status(plan: ClusterPlan, pod: PodPlan, *, wired: bool = True) -> dict[str, Any]:
    host = str(plan.node(pod.node).underlay_ip)
    if not wired:
        return {"phase": "Pending", "hostIP": host}
    return {"phase": "Running", "podIP": str(pod.ip), "hostIP": host}
