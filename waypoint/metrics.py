"""Istio's standard metrics, reported by the waypoint (`reporter="waypoint"`).

One registry per waypoint (`WaypointMetrics.registry`, served on /metrics by whoever runs the process):
the request counter and histograms for HTTP, and the TCP counters for tunnels it passes through at L4.
Names, labels and buckets are defined once for every proxy in `mesh.istiometrics`, so that Istio's
dashboards and queries carry over.  `peer_labels` fills the labels both share from what the waypoint
knows: the client's workload (by its address) and verified identity, the chosen endpoint, the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from mesh.bounded import BoundedMemo
from mesh.istiometrics import (
    CHILD_CACHE_SIZE,
    UNKNOWN,
    Reporter,
    RequestLabels,
    RequestMetrics,
    TcpLabels,
    TcpMetrics,
)
from waypoint.l7.model import Endpoint

__all__ = ["RequestLabels", "TcpLabels", "WaypointMetrics", "peer_labels"]

Recorder = Callable[[float], None]


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.http = RequestMetrics(self.registry, " by the waypoint")
        self.tcp = TcpMetrics(self.registry)
        # the metrics' children of each label set object the proxy reports with (the proxy keeps one object
        # per label set and table): found by the object's identity, neither its values nor their hash
        self._bound: BoundedMemo[int, _Bound] = BoundedMemo(CHILD_CACHE_SIZE)

    def record(self, labels: RequestLabels, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        """What `RequestMetrics.record` counts, into the same children."""
        bound = self._bound.get(id(labels))
        if bound is None or bound.labels is not labels:  # (an entry holds its object: an id is never reused)
            values, http = labels.values(), self.http
            bound = self._bound.keep(id(labels), _Bound(labels, *http.recorders(values)))
        bound.requests(1)
        bound.duration(duration_ms)
        bound.request_bytes(request_bytes)
        bound.response_bytes(response_bytes)


class _Bound:
    """The request metrics' recorders (`mesh.istiometrics.recorder`) for one label set object."""

    __slots__ = ("labels", "requests", "duration", "request_bytes", "response_bytes")

    def __init__(self, labels: RequestLabels, requests: Recorder, duration: Recorder, request_bytes: Recorder,
                 response_bytes: Recorder) -> None:
        self.labels = labels
        self.requests = requests
        self.duration = duration
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes


def _side(prefix: str, ep: Endpoint | None) -> dict[str, str]:
    if ep is None:
        return {}
    return {f"{prefix}_workload": ep.name, f"{prefix}_workload_namespace": ep.namespace,
            f"{prefix}_app": ep.app, f"{prefix}_version": ep.version,
            f"{prefix}_canonical_service": ep.canonical_service or ep.app,
            f"{prefix}_canonical_revision": ep.canonical_revision or ep.version, f"{prefix}_cluster": ep.cluster}


def peer_labels(*, source: Endpoint | None, source_namespace: str, source_principal: str,
                destination: Endpoint | None, service_host: str, service_name: str = "",
                service_namespace: str = "") -> dict[str, Any]:
    """The labels of who talked to whom, as keyword arguments of `RequestLabels` or `TcpLabels`."""
    out: dict[str, Any] = {"reporter": Reporter.WAYPOINT.value, "source_workload_namespace": source_namespace,
                           "source_principal": source_principal or UNKNOWN}
    out.update(_side("source", source))
    out.update(_side("destination", destination))
    if destination is not None:
        out["destination_principal"] = destination.identity
    out.update(destination_service=service_host, destination_service_name=service_name,
               destination_service_namespace=service_namespace)
    return {k: v for k, v in out.items() if v}
