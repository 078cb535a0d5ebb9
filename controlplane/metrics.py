"""The control plane's Prometheus metrics (port 15014) and its structured log lines.

Metric names follow Istio's control plane where one exists, so dashboards carry over:

    pilot_xds                       gauge      connected discovery clients
    pilot_xds_pushes_total          counter    responses pushed, by resource type
    pilot_proxy_convergence_time    histogram  seconds from a configuration change to its push being sent
    pilot_total_xds_rejects_total   counter    NACKs received, by resource type
    pilot_xds_acks_total            counter    ACKs received, by resource type
    controlplane_applies_total      counter    configuration applies accepted
    controlplane_rejected_applies_total counter configuration applies refused (validation errors)

Every apply and every push is also logged as one JSON line (`log_event`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

log = logging.getLogger("controlplane.events")


def short_type(type_url: str) -> str:
    """"type.googleapis.com/ambientmesh.discovery.v1.Workload" -> "Workload"."""
    return type_url.rsplit(".", 1)[-1]


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connected = Gauge("pilot_xds", "Connected discovery clients.", registry=r)
        self.pushes = Counter("pilot_xds_pushes", "Discovery responses pushed.", ["type"], registry=r)
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Seconds from a configuration change until its push is sent to a client.",
            buckets=PUSH_BUCKETS,
            registry=r,
        )
        self.rejects = Counter("pilot_total_xds_rejects", "Discovery responses NACKed.", ["type"], registry=r)
        self.acks = Counter("pilot_xds_acks", "Discovery responses ACKed.", ["type"], registry=r)
        self.applies = Counter("controlplane_applies", "Configuration applies accepted.", registry=r)
        self.rejected_applies = Counter(
            "controlplane_rejected_applies", "Configuration applies refused.", registry=r
        )

    def pushed(self, type_url: str, since: float | None) -> None:
        self.pushes.labels(short_type(type_url)).inc()
        if since is not None:
            self.convergence.observe(max(0.0, time.monotonic() - since))

    def acked(self, type_url: str) -> None:
        self.acks.labels(short_type(type_url)).inc()

    def nacked(self, type_url: str) -> None:
        self.rejects.labels(short_type(type_url)).inc()

    def apply(self, accepted: bool) -> None:
        (self.applies if accepted else self.rejected_applies).inc()


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured log line: {"ts": ..., "event": ..., **fields} as JSON."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    log.log(level, json.dumps(record, sort_keys=False, default=str))
