"""The one question the CA asks of the cluster: is a pod with this namespace and service account
scheduled on that node?  The control plane keeps the answer current from its config store."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class PodLocator(Protocol):
    """Narrow read-only view of pod placement, all the CA needs to authorize node agents."""

    def pod_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        """True if at least one pod in `namespace` running as `service_account` is scheduled on `node`."""
        ...


@dataclass(frozen=True)
class PodPlacement:
    namespace: str
    name: str
    service_account: str
    node: str


class InMemoryPodLocator:
    """A `PodLocator` its owner updates (thread-safe): `set_pods` replaces everything, `put`/`remove`
    change one pod (keyed by namespace and name)."""

    def __init__(self, pods: Iterable[PodPlacement] = ()) -> None:
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], PodPlacement] = {}
        self._index: dict[tuple[str, str, str], int] = {}
        self.set_pods(pods)

    def set_pods(self, pods: Iterable[PodPlacement]) -> None:
        with self._lock:
            self._pods = {(p.namespace, p.name): p for p in pods}
            self._reindex()

    def put(self, pod: PodPlacement) -> None:
        with self._lock:
            self._pods[(pod.namespace, pod.name)] = pod
            self._reindex()

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)
            self._reindex()

    def pods(self) -> list[PodPlacement]:
        with self._lock:
            return sorted(self._pods.values(), key=lambda p: (p.namespace, p.name))

    def pod_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        with self._lock:
            return self._index.get((node, namespace, service_account), 0) > 0

    def _reindex(self) -> None:
        index: dict[tuple[str, str, str], int] = {}
        for p in self._pods.values():
            key = (p.node, p.namespace, p.service_account)
            index[key] = index.get(key, 0) + 1
        self._index = index
