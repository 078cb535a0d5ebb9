"""The DNS proxy's metrics, with ztunnel's names and labels (on the agent's metrics port):

    istio_dns_requests_total                      every query the proxy took
    istio_dns_upstream_requests_total             queries forwarded to the upstream resolver
    istio_dns_upstream_failures_total             forwarded queries that got no answer (timeout, error)
    istio_dns_upstream_request_duration_seconds   how long the upstream took to answer

Labels: request_query_type (`a`, `aaaa`, ...), request_protocol (`udp`, `tcp`), source_canonical_service
and source_canonical_revision (the asking pod's; "unknown" when it is not known).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from mesh.istiometrics import UNKNOWN
from mesh.proto import discovery_pb2 as pb

LABELS = ("request_query_type", "request_protocol", "source_canonical_service", "source_canonical_revision")
DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.1, 1.0, 5.0)


@dataclass(frozen=True)
class DnsLabels:
    query_type: str
    protocol: str
    source: pb.Workload | None

    def values(self) -> tuple[str, str, str, str]:
        w = self.source
        return (self.query_type, self.protocol, (w.canonical_name if w is not None else "") or UNKNOWN,
                (w.canonical_revision if w is not None else "") or UNKNOWN)


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("istio_dns_requests", "Total number of DNS requests.", LABELS, registry=registry)
        self.upstream_requests = Counter("istio_dns_upstream_requests",
                                         "Total number of DNS requests forwarded to upstream.", LABELS,
                                         registry=registry)
        self.upstream_failures = Counter("istio_dns_upstream_failures",
                                         "Total number of DNS requests that failed to forward upstream.", LABELS,
                                         registry=registry)
        self.upstream_duration = Histogram("istio_dns_upstream_request_duration_seconds",
                                           "Time taken to get a DNS response from upstream.", LABELS,
                                           buckets=DURATION_BUCKETS, registry=registry)

    def request(self, labels: DnsLabels) -> None:
        self.requests.labels(*labels.values()).inc()

    def forwarded(self, labels: DnsLabels, seconds: float | None) -> None:
        """A query sent upstream: answered after `seconds`, or not at all (None)."""
        values = labels.values()
        self.upstream_requests.labels(*values).inc()
        if seconds is None:
            self.upstream_failures.labels(*values).inc()
        else:
            self.upstream_duration.labels(*values).observe(seconds)
