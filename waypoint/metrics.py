"""Istio's standard request metrics, reported by the waypoint (`reporter="waypoint"`).

One registry per waypoint (`WaypointMetrics.registry`, served on /metrics by whoever runs the process).
Label names and meanings follow Istio's standard metrics so that dashboards carry over.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service", "destination_service_name",
    "destination_service_namespace", "request_protocol", "response_code", "response_flags",
    "connection_security_policy",
)
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                    600000, 1800000, 3600000)
SIZE_BUCKETS = tuple(float(1 * 10**i) for i in range(9))


@dataclass(frozen=True)
class RequestLabels:
    source_workload: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"
    source_app: str = "unknown"
    source_version: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    destination_app: str = "unknown"
    destination_version: str = "unknown"
    destination_service: str = "unknown"
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    request_protocol: str = "http"
    response_code: str = "0"
    response_flags: str = "-"
    connection_security_policy: str = "mutual_tls"

    def values(self) -> dict[str, str]:
        out = {k: (v or "unknown") for k, v in self.__dict__.items()}
        out["reporter"] = "waypoint"
        return out


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("istio_requests_total", "Requests handled by the waypoint", LABELS, registry=r)
        self.duration = Histogram("istio_request_duration_milliseconds", "Request duration in milliseconds",
                                  LABELS, buckets=DURATION_BUCKETS, registry=r)
        self.request_bytes = Histogram("istio_request_bytes", "Request sizes in bytes (headers and body)",
                                       LABELS, buckets=SIZE_BUCKETS, registry=r)
        self.response_bytes = Histogram("istio_response_bytes", "Response sizes in bytes (headers and body)",
                                        LABELS, buckets=SIZE_BUCKETS, registry=r)
        self.tcp_opened = Counter("istio_tcp_connections_opened_total", "L4 connections passed through",
                                  ["reporter", "destination_service"], registry=r)

    def record(self, labels: RequestLabels, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        values = labels.values()
        self.requests.labels(**values).inc()
        self.duration.labels(**values).observe(duration_ms)
        self.request_bytes.labels(**values).observe(request_bytes)
        self.response_bytes.labels(**values).observe(response_bytes)
