"""The node agent's Prometheus metrics: Istio's standard TCP metrics, and the agent's own.

TCP metrics, with the label names Istio uses so that its dashboards and queries carry over:

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
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields, replace
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh import defaults
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb

UNKNOWN = "unknown"
NO_FLAGS = "-"
MUTUAL_TLS = "mutual_tls"
PLAINTEXT = "none"


class Reporter(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


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


# --- labels (pure) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpLabels:
    """The label values of one connection, in the order of `TCP_LABEL_NAMES`."""

    reporter: str
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = NO_FLAGS
    connection_security_policy: str = UNKNOWN

    def values(self) -> tuple[str, ...]:
        return tuple(str(v) for v in astuple(self))


TCP_LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TcpLabels))


def canonical_app(workload: pb.Workload) -> str:
    """The workload's canonical service: its `canonical_name`, else the usual labels, else its name."""
    labels: Mapping[str, str] = workload.labels
    return (workload.canonical_name or labels.get("service.istio.io/canonical-name")
            or labels.get("app.kubernetes.io/name") or labels.get("app") or workload.name or UNKNOWN)


def canonical_version(workload: pb.Workload) -> str:
    """The workload's canonical revision: its `canonical_revision`, else the usual labels, else "latest"."""
    labels: Mapping[str, str] = workload.labels
    return (workload.canonical_revision or labels.get("service.istio.io/canonical-revision")
            or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest")


def workload_principal(workload: pb.Workload) -> str:
    """The SPIFFE ID a workload runs as, from its record (trust domain, namespace, service account)."""
    if not workload.service_account or not workload.namespace:
        return UNKNOWN
    td = workload.trust_domain or defaults.TRUST_DOMAIN
    return f"spiffe://{td}/ns/{workload.namespace}/sa/{workload.service_account}"


def _principal(explicit: SpiffeId | str | None, workload: pb.Workload | None) -> str:
    if explicit is not None and str(explicit):
        return str(explicit)
    return workload_principal(workload) if workload is not None else UNKNOWN


def tcp_labels(
    reporter: Reporter | str,
    *,
    source: pb.Workload | None = None,
    source_principal: SpiffeId | str | None = None,
    destination: pb.Workload | None = None,
    destination_principal: SpiffeId | str | None = None,
    service: pb.Service | None = None,
    mutual_tls: bool = True,
) -> TcpLabels:
    """Labels for one connection from what the proxy knows about its two ends.

    A principal given explicitly (the verified peer identity) wins over the one derived from the
    workload record.  Reported by the destination, a plaintext connection (`mutual_tls=False`) has no
    verified source identity, so its source principal is "unknown" even when the source pod is known;
    reported by the source, the agent knows whose traffic it carries either way.
    """
    verified = mutual_tls or str(reporter) == Reporter.SOURCE
    src_principal = _principal(source_principal, source) if verified else UNKNOWN
    out = TcpLabels(
        reporter=str(reporter),
        source_principal=src_principal,
        destination_principal=_principal(destination_principal, destination),
        connection_security_policy=MUTUAL_TLS if mutual_tls else PLAINTEXT,
    )
    if source is not None:
        out = replace(out, source_workload=source.name or UNKNOWN,
                      source_workload_namespace=source.namespace or UNKNOWN,
                      source_app=canonical_app(source), source_version=canonical_version(source),
                      source_cluster=source.cluster_id or UNKNOWN)
    if destination is not None:
        out = replace(out, destination_workload=destination.name or UNKNOWN,
                      destination_workload_namespace=destination.namespace or UNKNOWN,
                      destination_app=canonical_app(destination),
                      destination_version=canonical_version(destination),
                      destination_cluster=destination.cluster_id or UNKNOWN)
    if service is not None:
        out = replace(out, destination_service=service.hostname or UNKNOWN,
                      destination_service_name=service.name or UNKNOWN,
                      destination_service_namespace=service.namespace or UNKNOWN)
    return out


# --- per-connection counting ----------------------------------------------------------------------------


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class ConnectionMetrics:
    """The metrics of one open connection.  `close()` is idempotent; counting after close is ignored."""

    __slots__ = ("_metrics", "labels", "_sent", "_received", "sent", "received", "_state")

    def __init__(self, metrics: TcpMetrics, labels: TcpLabels) -> None:
        values = labels.values()
        self._metrics = metrics
        self.labels = labels
        self._sent = metrics.sent_bytes.labels(*values)
        self._received = metrics.received_bytes.labels(*values)
        self.sent = 0  # bytes written to the client so far (for the access log)
        self.received = 0  # bytes read from the client so far
        self._state = _State.OPEN
        metrics.opened.labels(*values).inc()

    def add_received(self, n: int) -> None:
        """Count `n` bytes read from the client (towards the server: the request direction)."""
        if n > 0 and self._state is _State.OPEN:
            self.received += n
            self._received.inc(n)

    def add_sent(self, n: int) -> None:
        """Count `n` bytes written to the client (from the server: the response direction)."""
        if n > 0 and self._state is _State.OPEN:
            self.sent += n
            self._sent.inc(n)

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def close(self, response_flags: str | None = None) -> None:
        """Count the connection as closed.  `response_flags` (a `ResponseFlag`) labels the closed
        counter only, as the other counters were labelled when the connection opened."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        labels = self.labels
        if response_flags is not None and response_flags != labels.response_flags:
            labels = replace(labels, response_flags=str(response_flags))
        self._metrics.closed.labels(*labels.values()).inc()

    def __enter__(self) -> ConnectionMetrics:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class TcpMetrics:
    """Istio's four TCP counters on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        names = TCP_LABEL_NAMES
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened.", names, registry=registry)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed.", names, registry=registry)
        self.sent_bytes = Counter("istio_tcp_sent_bytes", "Bytes sent to the client (response direction).",
                                  names, registry=registry)
        self.received_bytes = Counter("istio_tcp_received_bytes",
                                      "Bytes received from the client (request direction).", names, registry=registry)

    def open(self, labels: TcpLabels) -> ConnectionMetrics:
        """Count a connection as opened; count its bytes and its close on the returned object."""
        return ConnectionMetrics(self, labels)


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
