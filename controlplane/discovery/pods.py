"""Pod placement for the CA, read from the workloads the discovery server currently serves.

The CA asks one question (`ca.pods.PodLocator`): is a pod with this namespace and service account on
that node?  The Workload resources answer it, so the CA and discovery can never disagree about where a
pod runs.  The index is rebuilt lazily when the served snapshot changes (safe from any thread).
"""

from __future__ import annotations

import threading
from typing import Protocol

from controlplane.discovery.state import Resources
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs


class _Served(Protocol):
    @property
    def version(self) -> str: ...

    def resources(self) -> Resources: ...


class WorkloadPodLocator:
    def __init__(self, served: _Served) -> None:
        self._served = served
        self._lock = threading.Lock()
        self._version: str | None = None
        self._index: set[tuple[str, str, str]] = set()

    def pod_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        with self._lock:
            version = self._served.version
            if version != self._version:
                self._index = _index(self._served.resources())
                self._version = version
            return (node, namespace, service_account) in self._index


def _index(resources: Resources) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for _, packed in resources.get(rs.WORKLOAD, {}).values():
        w = pb.Workload()
        if packed.Unpack(w):
            out.add((w.node, w.namespace, w.service_account or "default"))
    return out
