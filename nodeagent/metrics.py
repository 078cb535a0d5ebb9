"""The node agent's Prometheus metrics: Istio's standard TCP metrics, and the agent's own.

TCP metrics (defined once for every proxy in `mesh.istiometrics`, with Istio's names and labels):

    istio_tcp_connections_opened_total   connections opened
    istio_tcp_connections_closed_total   connections closed
    istio_tcp_received_bytes_total       bytes received from the client (the request direction)
    istio_tcp_sent_bytes_total           bytes sent to the client (the response direction)

Each connection is reported by the agent that proxies it: `reporter="source"` by the client's agent on
the outbound path, `reporter="destination"` by the server's agent on the inbound path.  A value that is
not known is "unknown".

The agent's own metrics:

    mesh_agent_connection_failures_total{direction, reason}   connections refused or failed
    mesh_agent_enrolled_pods                                   pods enrolled on this node
    mesh_agent_xds_connected                                   1 while the discovery stream is up
    mesh_agent_certificate_expiry_timestamp_seconds{identity}  when each held certificate expires

A proxy calls `TcpMetrics.open(labels)` once per connection and gets a `ConnectionMetrics`; counting
bytes on it (`add_received(n)`, `add_sent(n)`) costs one addition and one increment of a counter that
was looked up once at open, so it can be called for every chunk relayed.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.identity import SpiffeId
from mesh.istiometrics import (
    MUTUAL_TLS,
    NO_FLAGS,
    PLAINTEXT,
    TCP_LABEL_NAMES,
    UNKNOWN,
    ConnectionMetrics,
    Reporter,
    TcpLabels,
    TcpMetrics,
    canonical_app,
    canonical_version,
    tcp_labels,
    workload_principal,
)

__all__ = [  # the TCP metrics are re-exported: the agent's parts import them from here
    "MUTUAL_TLS", "NO_FLAGS", "PLAINTEXT", "TCP_LABEL_NAMES", "UNKNOWN", "AgentMetrics", "ConnectionMetrics",
    "FailureReason", "NodeAgentMetrics", "Reporter", "ResponseFlag", "TcpLabels", "TcpMetrics", "canonical_app",
    "canonical_version", "tcp_labels", "workload_principal",
]


class ResponseFlag(enum.StrEnum):
    """Short flags for `response_flags` (Envoy's spelling, which Istio's dashboards know)."""

    NONE = "-"
    UPSTREAM_CONNECT_FAILURE = "UF"  # the destination refused or did not answer
    NO_HEALTHY_UPSTREAM = "UH"  # a service without a healthy endpoint
    NO_ROUTE = "NR"  # no way to reach the destination
    DENIED = "RBAC"  # refused by an authorization policy
    DOWNSTREAM_TERMINATED = "DC"  # the client's side broke while relaying
    UPSTREAM_TERMINATED = "UC"  # the destination's side broke while relaying


class FailureReason(enum.StrEnum):
    """Values of `reason` on `mesh_agent_connection_failures_total` (a small, fixed set)."""

    DENIED = "denied"
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    NO_ENDPOINT = "no_healthy_endpoint"
    TLS_HANDSHAKE = "tls_handshake"
    BAD_REQUEST = "bad_request"  # e.g. a CONNECT authority that is not this pod
    UNKNOWN_DESTINATION = "unknown_destination"  # the destination pod is no longer in the agent's view
    TUNNEL = "tunnel_error"  # HBONE stream reset or protocol error
    NO_CERTIFICATE = "no_certificate"
    LISTENER_FULL = "listener_full"  # over the cap of connections of a pod's HBONE listener
    SELF_CALL = "self_call"  # addressed to the agent itself (its ports, loopback): refused, never dialled


# --- the agent's own metrics ----------------------------------------------------------------------------


class AgentMetrics:
    """Health of the agent itself (enrollment, discovery, certificates, failed connections)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connection_failures = Counter(
            "mesh_agent_connection_failures", "Connections the agent refused or could not carry.",
            ["direction", "reason"], registry=registry)
        self.enrolled_pods = Gauge("mesh_agent_enrolled_pods", "Pods enrolled in the mesh on this node.",
                                   registry=registry)
        self.xds_connected = Gauge("mesh_agent_xds_connected", "1 while the discovery stream is connected.",
                                   registry=registry)
        self.certificate_expiry = Gauge(
            "mesh_agent_certificate_expiry_timestamp_seconds",
            "When the certificate held for each identity expires (Unix time).", ["identity"], registry=registry)

    def connection_failed(self, direction: str, reason: FailureReason | str) -> None:
        """`direction` is "inbound" or "outbound"."""
        self.connection_failures.labels(direction, str(reason)).inc()

    def set_enrolled_pods(self, n: int) -> None:
        self.enrolled_pods.set(n)

    def set_xds_connected(self, connected: bool) -> None:
        self.xds_connected.set(1 if connected else 0)

    def set_certificate_expiry(self, identity: SpiffeId | str, not_after: float) -> None:
        self.certificate_expiry.labels(str(identity)).set(not_after)

    def forget_certificate(self, identity: SpiffeId | str) -> None:
        """Drop the series of an identity whose certificate the agent no longer holds."""
        with contextlib.suppress(KeyError):
            self.certificate_expiry.remove(str(identity))


@dataclass
class NodeAgentMetrics:
    """Both sets on one registry: what the agent process creates once and hands to its parts."""

    registry: CollectorRegistry
    tcp: TcpMetrics
    agent: AgentMetrics

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> NodeAgentMetrics:
        r = registry if registry is not None else CollectorRegistry()
        return cls(r, TcpMetrics(r), AgentMetrics(r))
