"""Istio's standard metrics, defined once for every proxy of the mesh: names, labels, buckets.

    istio_requests_total                     requests (waypoints: reporter="waypoint")
    istio_request_duration_milliseconds      histogram, Istio's buckets (DURATION_BUCKETS)
    istio_request_bytes / istio_response_bytes   histograms, headers and body (SIZE_BUCKETS)
    istio_tcp_connections_opened_total / _closed_total / istio_tcp_sent_bytes_total / _received_bytes_total

Label names and meanings are Istio's (istio.io, 'Istio Standard Metrics'), so that its dashboards,
recording rules and users' queries carry over: `reporter`, each end's `*_workload`, `*_workload_namespace`,
`*_principal`, `*_app`, `*_version`, `*_canonical_service`, `*_canonical_revision`, `*_cluster`, the
`destination_service*`, `request_protocol`, `response_flags`, `connection_security_policy`; requests add
`response_code` and `grpc_response_status`.  A value that is not known is "unknown".

Node agents report TCP (`reporter="source"` on the client's side, `"destination"` on the server's); a
waypoint reports requests and the TCP it passes through (`reporter="waypoint"`).  A proxy calls
`TcpMetrics.open(labels)` once per connection and gets a `ConnectionMetrics`; counting bytes on it costs
one addition and one increment of a counter that was looked up once at open, so it can be called for
every chunk relayed.

prometheus_client's `labels()` is slow next to the rest of a request (it validates, converts and locks on
every call), so each metric's children are cached per label tuple (`_Children`, bounded).  The children
are never removed from these metrics, so a cached child is always the one `labels()` would return.  What
the data path calls on them is `recorder(child)`: the child's own count or observation less the checks
prometheus_client repeats on every call (see there).
"""

from __future__ import annotations

import enum
import operator
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from mesh import defaults
from mesh.bounded import BoundedMemo
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb

UNKNOWN = "unknown"
NO_FLAGS = "-"
MUTUAL_TLS = "mutual_tls"
PLAINTEXT = "none"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's cluster id when none is configured

# Istio's buckets for istio_request_duration_milliseconds (milliseconds) and for the size histograms.
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                    600000, 1800000, 3600000)
SIZE_BUCKETS = tuple(float(10**i) for i in range(9))  # 1, 10, ... 100 MB
CHILD_CACHE_SIZE = 4096  # label sets whose metric children are kept per metric family; cleared when full


class Reporter(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"
    WAYPOINT = "waypoint"


# --- labels (pure) -------------------------------------------------------------------------------------


_GETTERS: dict[type, Callable[[object], tuple[Any, ...]]] = {}
_STR_ONLY = {str}


def _raw_values(labels: PeerLabels) -> tuple[Any, ...]:
    """The field values in field order, read at once (`astuple` deep-copies, and this runs for every
    connection and request)."""
    getter = _GETTERS.get(type(labels))
    if getter is None:
        getter = _GETTERS[type(labels)] = operator.attrgetter(*(f.name for f in fields(labels)))
    return getter(labels)


@dataclass(frozen=True)
class PeerLabels:
    """Who talked to whom: the labels every Istio metric carries, in Istio's order."""

    reporter: str
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_cluster: str = UNKNOWN

    def values(self) -> tuple[str, ...]:
        """The values in field order; an empty one is "unknown"."""
        raw = _raw_values(self)
        if "" not in raw and set(map(type, raw)) <= _STR_ONLY:  # the usual case: nothing to convert
            return raw
        return tuple([str(v) or UNKNOWN for v in raw])


@dataclass(frozen=True)
class TcpLabels(PeerLabels):
    """The label values of one TCP connection, in the order of `TCP_LABEL_NAMES`."""

    request_protocol: str = "tcp"
    response_flags: str = NO_FLAGS
    connection_security_policy: str = UNKNOWN


@dataclass(frozen=True)
class RequestLabels(PeerLabels):
    """The label values of one request, in the order of `REQUEST_LABEL_NAMES`."""

    request_protocol: str = "http"
    response_code: str = "0"
    grpc_response_status: str = ""  # Istio leaves it empty for requests that are not gRPC
    response_flags: str = NO_FLAGS
    connection_security_policy: str = MUTUAL_TLS

    def values(self) -> tuple[str, ...]:
        raw = _raw_values(self)
        grpc = self.grpc_response_status
        # the usual case: all strings, and none empty but (perhaps) the gRPC status, which stays as it is
        if raw.count("") == (grpc == "") and set(map(type, raw)) <= _STR_ONLY:
            return raw
        out = [str(v) or UNKNOWN for v in raw]
        out[_GRPC_STATUS] = grpc
        return tuple(out)


TCP_LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TcpLabels))
REQUEST_LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RequestLabels))
_GRPC_STATUS = REQUEST_LABEL_NAMES.index("grpc_response_status")


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
                      source_canonical_service=canonical_app(source),
                      source_canonical_revision=canonical_version(source),
                      source_cluster=source.cluster_id or UNKNOWN)
    if destination is not None:
        out = replace(out, destination_workload=destination.name or UNKNOWN,
                      destination_workload_namespace=destination.namespace or UNKNOWN,
                      destination_app=canonical_app(destination),
                      destination_version=canonical_version(destination),
                      destination_canonical_service=canonical_app(destination),
                      destination_canonical_revision=canonical_version(destination),
                      destination_cluster=destination.cluster_id or UNKNOWN)
    if service is not None:
        out = replace(out, destination_service=service.hostname or UNKNOWN,
                      destination_service_name=service.name or UNKNOWN,
                      destination_service_namespace=service.namespace or UNKNOWN)
    return out


# --- metric children, cached -----------------------------------------------------------------------------


def recorder(child: Any) -> Callable[[float], None]:
    """How to count `amount` into a counter's child or observe it in a histogram's: `recorder(c)(n)` does
    what `c.inc(n)` or `c.observe(n)` does, into the same values, without the checks prometheus_client
    makes on every call (that the metric has its labels, which a child has; that a counter's amount is
    not negative, which its callers ensure: byte counts, and 1).  `Counter.inc` is four Python calls and
    `Histogram.observe` five and a walk of its buckets; this is the value's own `inc`, or for a histogram
    one call and two `inc`s (the bucket found by bisection: the first bound >= the amount, as the walk
    finds it).  A child without these attributes (another version of the client) gets its own method."""
    value: Any = getattr(child, "_value", None)
    if isinstance(child, Counter) and callable(getattr(value, "inc", None)):
        return value.inc  # type: ignore[no-any-return]
    sum_value: Any = getattr(child, "_sum", None)
    buckets: Any = getattr(child, "_buckets", None)
    bounds: Any = getattr(child, "_upper_bounds", None)
    if isinstance(child, Histogram) and sum_value is not None and buckets and bounds \
            and len(buckets) == len(bounds) and bounds[-1] == float("inf"):
        add_sum, bucket_incs, upper = sum_value.inc, [b.inc for b in buckets], list(bounds)

        def observe(amount: float) -> None:
            add_sum(amount)
            bucket_incs[bisect_left(upper, amount)](1)

        return observe
    return child.inc if isinstance(child, Counter) else child.observe  # type: ignore[no-any-return]


class _Children:
    """The recorders (`recorder`) of `metric.labels(*values)` for a few metrics at once, cached per values
    tuple (at most `size` tuples; the cache is emptied when full, and the children themselves stay in the
    metrics, so a recorder made again counts into the same child)."""

    __slots__ = ("_metrics", "_recorders")

    def __init__(self, *metrics: MetricWrapperBase, size: int = CHILD_CACHE_SIZE) -> None:
        self._metrics = metrics
        self._recorders: BoundedMemo[tuple[str, ...], tuple[Callable[[float], None], ...]] = BoundedMemo(size)

    def recorders(self, values: tuple[str, ...]) -> tuple[Callable[[float], None], ...]:
        found = self._recorders.get(values)
        if found is None:
            found = self._recorders.keep(values, tuple(recorder(metric.labels(*values)) for metric in self._metrics))
        return found


# --- requests ----------------------------------------------------------------------------------------------


class RequestMetrics:
    """Istio's request metrics on `registry`: the counter and the three histograms."""

    def __init__(self, registry: CollectorRegistry, help_suffix: str = "") -> None:
        names, r = REQUEST_LABEL_NAMES, registry
        self.requests = Counter("istio_requests_total", "Requests handled" + help_suffix, names, registry=r)
        self.duration = Histogram("istio_request_duration_milliseconds", "Request duration in milliseconds",
                                  names, buckets=DURATION_BUCKETS, registry=r)
        self.request_bytes = Histogram("istio_request_bytes", "Request sizes in bytes (headers and body)",
                                       names, buckets=SIZE_BUCKETS, registry=r)
        self.response_bytes = Histogram("istio_response_bytes", "Response sizes in bytes (headers and body)",
                                        names, buckets=SIZE_BUCKETS, registry=r)
        self._children = _Children(self.requests, self.duration, self.request_bytes, self.response_bytes)

    def recorders(self, values: tuple[str, ...]) -> tuple[Callable[[float], None], ...]:
        """The recorders of the four metrics' children for one label values tuple (requests, duration,
        request size, response size)."""
        return self._children.recorders(values)

    def record(self, labels: RequestLabels, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        requests, duration, request_size, response_size = self._children.recorders(labels.values())
        requests(1)
        duration(duration_ms)
        request_size(request_bytes)
        response_size(response_bytes)


# --- per-connection counting ----------------------------------------------------------------------------


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class ConnectionMetrics:
    """The metrics of one open connection.  `close()` is idempotent; counting after close is ignored."""

    __slots__ = ("_metrics", "labels", "_sent", "_received", "sent", "received", "_state")

    def __init__(self, metrics: TcpMetrics, labels: TcpLabels) -> None:
        opened, self._sent, self._received = metrics._open_children.recorders(labels.values())
        self._metrics = metrics
        self.labels = labels
        self.sent = 0  # bytes written to the client so far (for the access log)
        self.received = 0  # bytes read from the client so far
        self._state = _State.OPEN
        opened(1)

    def add_received(self, n: int) -> None:
        """Count `n` bytes read from the client (towards the server: the request direction)."""
        if n > 0 and self._state is _State.OPEN:
            self.received += n
            self._received(n)

    def add_sent(self, n: int) -> None:
        """Count `n` bytes written to the client (from the server: the response direction)."""
        if n > 0 and self._state is _State.OPEN:
            self.sent += n
            self._sent(n)

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    def close(self, response_flags: str | None = None) -> None:
        """Count the connection as closed.  `response_flags` (Envoy's short flag) labels the closed
        counter only, as the other counters were labelled when the connection opened."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        labels = self.labels
        if response_flags is not None and response_flags != labels.response_flags:
            labels = replace(labels, response_flags=str(response_flags))
        self._metrics._closed_children.recorders(labels.values())[0](1)

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
        self._open_children = _Children(self.opened, self.sent_bytes, self.received_bytes)
        self._closed_children = _Children(self.closed)

    def open(self, labels: TcpLabels) -> ConnectionMetrics:
        """Count a connection as opened; count its bytes and its close on the returned object."""
        return ConnectionMetrics(self, labels)
