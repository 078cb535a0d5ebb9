"""What the local cluster tells the control plane: its namespaces, service accounts, pods and services,
as Kubernetes would report them (pods with `status.podIP` and their node, services with a clusterIP)."""

from __future__ import annotations

import copy
from typing import Any

from localcluster.plan import ClusterPlan
from localcluster.spec import ClusterSpec


def cluster_objects(spec: ClusterSpec, plan: ClusterPlan) -> list[dict[str, Any]]:
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
            body["status"] = {"phase": "Running", "podIP": str(pod.ip), "hostIP": str(plan.node(pod.node).underlay_ip)}
        elif kind == "Service":
            body.setdefault("spec", {})["clusterIP"] = str(services[key].cluster_ip)
        out.append(body)
    return out
