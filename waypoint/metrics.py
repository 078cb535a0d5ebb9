"""Istio's standard metrics, reported by the waypoint (`reporter="waypoint"`).

One registry per waypoint (`WaypointMetrics.registry`, served on /metrics by whoever runs the process):
the request counter and histograms for HTTP, and the TCP counters for tunnels it passes through at L4.
Names, labels and buckets are defined once for every proxy in `mesh.istiometrics`, so that Istio's
dashboards and queries carry over.  `peer_labels` fills the labels both share from what the waypoint
knows: the client's workload (by its address) and verified identity, the chosen endpoint, the service.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from mesh.istiometrics import UNKNOWN, Reporter, RequestLabels, RequestMetrics, TcpLabels, TcpMetrics
from waypoint.l7.model import Endpoint

__all__ = ["RequestLabels", "TcpLabels", "WaypointMetrics", "peer_labels"]


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.http = RequestMetrics(self.registry, " by the waypoint")
        self.tcp = TcpMetrics(self.registry)

    def record(self, labels: RequestLabels, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        self.http.record(labels, duration_ms, request_bytes, response_bytes)


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
