"""The service graph of a namespace, from Istio's metrics in Prometheus (pure: samples in, a graph out).

    exprs = queries("bookinfo", "1m")              # name -> PromQL; the caller runs them
    graph = build("bookinfo", {name: samples}, waypoints=[WaypointRef("bookinfo", "waypoint", principal)])

What is drawn, and from which series (the reporters are Istio's):

- **HTTP edges** (source workload -> destination workload, per service): `istio_requests_total` and
  `istio_request_duration_milliseconds` reported by waypoints (the node agents see only TCP), with the
  waypoint that reported them (its scrape target's `namespace`/`pod`): the edge passes that waypoint.
  `requests` and `errors` (5xx) are counts since the proxies started, exact as of the last scrape;
  `rate` and `error_rate` are per second and a ratio over the window; p50/p90/p99 come from the
  histogram's bucket rates over the window (`histogram_quantile`, so that a link that carries several
  edges gets the quantile of their merged buckets, not a guess from theirs).
- **TCP edges**: `istio_tcp_*` as the destination's node agent reports them (it verified the client's
  certificate, so its `connection_security_policy` is the truth), else as the source's agent reports
  them (a destination outside the mesh has no agent), else as a waypoint reports L4 passthrough.  The
  hops in and out of a waypoint are not edges of their own (the waypoint's HTTP edges are the traffic
  they carry): the hop out of a waypoint gives the lock of the link from the waypoint to the workload.
- `mtls` of an edge: every series of it says `connection_security_policy="mutual_tls"` (as its reporter
  saw the connection it arrived on).
- Nodes: workloads, the services an edge was addressed to, waypoints, and "unknown" (clients outside the
  mesh that no agent could name).  Each edge's `path` is the nodes it is drawn through: source, service,
  waypoint, destination.  `links` are those drawn segments with the edges that share them summed (rates,
  errors, merged buckets for p99); a link's `mtls` is None when no reporter saw that hop.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshctl.dashboard.prom import Sample, either, histogram_quantile, le

UNKNOWN = "unknown"
MUTUAL_TLS = "mutual_tls"
DEFAULT_WINDOW = "1m"
QUANTILES = (0.5, 0.9, 0.99)
# The labels an edge is told apart by.  `namespace` and `pod` are the scrape target's: for a waypoint,
# which one reported the series.
GROUP = ("namespace", "pod", "source_workload", "source_workload_namespace", "source_principal",
         "destination_workload", "destination_workload_namespace", "destination_principal", "destination_service",
         "destination_service_namespace", "connection_security_policy")
NAMESPACE_LABELS = ("source_workload_namespace", "destination_workload_namespace", "destination_service_namespace")


def _union(template: str, metric: str, namespace: str, extra: str = "") -> str:
    """`template` (with `{sel}` for the selector) once per namespace label, joined with `or`."""
    return " or ".join(template.format(sel=sel) for sel in either(metric, NAMESPACE_LABELS, namespace, extra))


def queries(namespace: str, window: str = DEFAULT_WINDOW) -> dict[str, str]:
    """The instant queries a namespace's graph is built from."""
    by = ", ".join(GROUP)
    http = 'reporter="waypoint"'
    return {
        "http_total": _union(f"sum by ({by}, response_code) ({{sel}})", "istio_requests_total", namespace, http),
        "http_rate": _union(f"sum by ({by}, response_code) (rate({{sel}}[{window}]))", "istio_requests_total",
                            namespace, http),
        "http_buckets": _union(f"sum by ({by}, le) (rate({{sel}}[{window}]))",
                               "istio_request_duration_milliseconds_bucket", namespace, http),
        "tcp_total": _union(f"sum by (reporter, {by}) ({{sel}})", "istio_tcp_connections_opened_total", namespace),
        "tcp_rate": _union(f"sum by (reporter, {by}) (rate({{sel}}[{window}]))", "istio_tcp_connections_opened_total",
                           namespace),
        "tcp_sent": _union(f"sum by (reporter, {by}) (rate({{sel}}[{window}]))", "istio_tcp_sent_bytes_total",
                           namespace),
        "tcp_received": _union(f"sum by (reporter, {by}) (rate({{sel}}[{window}]))",
                               "istio_tcp_received_bytes_total", namespace),
    }


@dataclass(frozen=True)
class WaypointRef:
    """A waypoint the graph may pass through: its pod and the identity it runs as."""

    namespace: str
    name: str
    principal: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _principal(value: str) -> str:
    return value.removeprefix("spiffe://")


def _known(value: str | None) -> str:
    return value if value and value != UNKNOWN else ""


def workload_id(namespace: str, name: str) -> str:
    return f"workload:{namespace}/{name}" if _known(name) else UNKNOWN


def service_id(host: str) -> str:
    return f"service:{host}"


def waypoint_id(key: str) -> str:
    return f"waypoint:{key}"


@dataclass
class _Figures:
    """What is summed for one edge or link while the graph is built."""

    requests: float = 0.0
    errors: float = 0.0
    rate: float = 0.0
    error_rate: float = 0.0  # errors per second
    codes: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)
    connections: float = 0.0
    connection_rate: float = 0.0
    sent: float = 0.0  # bytes per second, towards the client
    received: float = 0.0  # bytes per second, from the client
    security: set[str] = field(default_factory=set)

    def add_buckets(self, other: Mapping[float, float]) -> None:
        for bound, value in other.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + value

    def quantiles(self) -> dict[str, float | None]:
        return {f"p{round(q * 100)}": _ms(histogram_quantile(q, self.buckets)) for q in QUANTILES}


def _ms(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


def _finite(value: float) -> float:
    return 0.0 if math.isnan(value) or math.isinf(value) else value


@dataclass(frozen=True)
class _Key:
    protocol: str  # http | tcp
    source: str  # node id
    destination: str  # node id
    service: str  # host, "" when not known
    waypoint: str  # "ns/name", "" when not through a waypoint


def _is_error(code: str) -> bool:
    return code.startswith("5") or code == "0"  # no answer at all counts as a failure, as Envoy's spans do


class _Builder:
    def __init__(self, waypoints: Sequence[WaypointRef]) -> None:
        self.waypoints = {w.key: w for w in waypoints}
        self.waypoint_principals = {_principal(w.principal): w for w in waypoints if w.principal}
        self.edges: dict[_Key, _Figures] = defaultdict(_Figures)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.hops_out: dict[tuple[str, str], set[str]] = defaultdict(set)  # (waypoint id, workload id) -> security

    # ---- nodes -----------------------------------------------------------------------------------------

    def workload(self, namespace: str, name: str) -> str:
        node = workload_id(namespace, name)
        if node == UNKNOWN:
            self.nodes.setdefault(UNKNOWN, {"id": UNKNOWN, "kind": "unknown", "namespace": "", "name": UNKNOWN})
        else:
            self.nodes.setdefault(node, {"id": node, "kind": "workload", "namespace": namespace, "name": name})
        return node

    def service(self, host: str, namespace: str) -> str:
        node = service_id(host)
        self.nodes.setdefault(node, {"id": node, "kind": "service", "namespace": _known(namespace),
                                     "name": host.split(".")[0], "host": host})
        return node

    def waypoint(self, key: str) -> str:
        node = waypoint_id(key)
        namespace, _, name = key.partition("/")
        self.nodes.setdefault(node, {"id": node, "kind": "waypoint", "namespace": namespace, "name": name})
        return node

    def is_waypoint_workload(self, namespace: str, name: str, principal: str) -> WaypointRef | None:
        return self.waypoints.get(f"{namespace}/{name}") or self.waypoint_principals.get(_principal(principal))

    # ---- edges -----------------------------------------------------------------------------------------

    def key(self, protocol: str, labels: Mapping[str, str], waypoint: str) -> _Key:
        src = self.workload(labels.get("source_workload_namespace", ""), labels.get("source_workload", ""))
        dst = self.workload(labels.get("destination_workload_namespace", ""), labels.get("destination_workload", ""))
        host = _known(labels.get("destination_service"))
        if host:
            self.service(host, labels.get("destination_service_namespace", ""))
        if waypoint:
            self.waypoint(waypoint)
        return _Key(protocol, src, dst, host, waypoint)

    def reporting_waypoint(self, labels: Mapping[str, str]) -> str:
        return f"{labels['namespace']}/{labels['pod']}" if labels.get("pod") and labels.get("namespace") else ""

    def http(self, results: Mapping[str, Sequence[Sample]]) -> None:
        for name in ("http_total", "http_rate"):
            for s in results.get(name, ()):
                fig = self.edges[self.key("http", s.labels, self.reporting_waypoint(s.labels))]
                code, value = s.labels.get("response_code", ""), _finite(s.value)
                fig.security.add(s.labels.get("connection_security_policy", UNKNOWN))
                if name == "http_total":
                    fig.requests += value
                    fig.codes[code] = fig.codes.get(code, 0.0) + value
                    if _is_error(code):
                        fig.errors += value
                else:
                    fig.rate += value
                    if _is_error(code):
                        fig.error_rate += value
        for s in results.get("http_buckets", ()):
            fig = self.edges[self.key("http", s.labels, self.reporting_waypoint(s.labels))]
            fig.add_buckets({le(s.labels): _finite(s.value)})

    def tcp(self, results: Mapping[str, Sequence[Sample]]) -> None:
        """TCP edges: the destination's report, else the source's, else a waypoint's L4 passthrough."""
        by_reporter: dict[str, dict[_Key, _Figures]] = defaultdict(lambda: defaultdict(_Figures))
        for name in ("tcp_total", "tcp_rate", "tcp_sent", "tcp_received"):
            for s in results.get(name, ()):
                labels, reporter = s.labels, s.labels.get("reporter", "")
                wp = self.reporting_waypoint(labels) if reporter == "waypoint" else ""
                src_wp = self.is_waypoint_workload(labels.get("source_workload_namespace", ""),
                                                   labels.get("source_workload", ""),
                                                   labels.get("source_principal", ""))
                if reporter == "destination" and src_wp is not None:
                    # The hop out of a waypoint: the lock of the link from the waypoint to the workload.
                    dst = self.workload(labels.get("destination_workload_namespace", ""),
                                        labels.get("destination_workload", ""))
                    self.hops_out[(waypoint_id(src_wp.key), dst)].add(
                        labels.get("connection_security_policy", UNKNOWN))
                    continue
                if reporter == "source" and _principal(labels.get("destination_principal", "")) in \
                        self.waypoint_principals:
                    continue  # the hop into a waypoint: the waypoint's own edges carry this traffic
                key = self.key("tcp", labels, wp)
                if reporter == "destination":
                    key = _Key("tcp", key.source, key.destination, "", "")  # the destination knows no service
                fig = by_reporter[reporter][key]
                value = _finite(s.value)
                fig.security.add(labels.get("connection_security_policy", UNKNOWN))
                if name == "tcp_total":
                    fig.connections += value
                elif name == "tcp_rate":
                    fig.connection_rate += value
                elif name == "tcp_sent":
                    fig.sent += value
                else:
                    fig.received += value
        services: dict[tuple[str, str], str] = {}
        for key in by_reporter["source"]:
            if key.service:
                services.setdefault((key.source, key.destination), key.service)
        reported = {(k.source, k.destination) for k in by_reporter["destination"]}
        for key, fig in by_reporter["destination"].items():
            self.edges[_Key("tcp", key.source, key.destination, services.get((key.source, key.destination), ""),
                            "")] = fig
        for key, fig in by_reporter["source"].items():
            if (key.source, key.destination) not in reported:
                self.edges[key] = fig
        for key, fig in by_reporter["waypoint"].items():
            self.edges[key] = fig

    # ---- out -------------------------------------------------------------------------------------------

    def path(self, key: _Key) -> list[str]:
        out = [key.source]
        if key.service:
            out.append(service_id(key.service))
        if key.waypoint:
            out.append(waypoint_id(key.waypoint))
        out.append(key.destination)
        return out


def _edge_id(key: _Key) -> str:
    out = f"{key.protocol}:{key.source}>{key.destination}"
    if key.service:
        out += f"@{key.service}"
    if key.waypoint:
        out += f"~{key.waypoint}"
    return out


def _name(node: str) -> tuple[str, str]:
    """(namespace, name) of a workload node id."""
    if node == UNKNOWN:
        return "", UNKNOWN
    namespace, _, name = node.removeprefix("workload:").partition("/")
    return namespace, name


def _round(value: float, digits: int = 4) -> float:
    return round(value, digits)


def _edge_json(key: _Key, fig: _Figures, path: list[str]) -> dict[str, Any]:
    src_ns, src = _name(key.source)
    dst_ns, dst = _name(key.destination)
    http = key.protocol == "http"
    out: dict[str, Any] = {
        "id": _edge_id(key), "protocol": key.protocol, "source": src, "source_namespace": src_ns,
        "destination": dst, "destination_namespace": dst_ns, "service": key.service or None,
        "waypoint": key.waypoint or None, "mtls": bool(fig.security) and fig.security == {MUTUAL_TLS},
        "path": path,
        "requests": round(fig.requests) if http else None, "errors": round(fig.errors) if http else None,
        "rate": _round(fig.rate) if http else None,
        "error_rate": _round(fig.error_rate / fig.rate) if http and fig.rate > 0 else (0.0 if http else None),
    }
    quantiles = fig.quantiles() if http else {f"p{round(q * 100)}": None for q in QUANTILES}
    out.update(quantiles)
    out["codes"] = {c: round(v) for c, v in sorted(fig.codes.items())} if http else None
    out["connections"] = None if http else round(fig.connections)
    out["connection_rate"] = None if http else _round(fig.connection_rate)
    out["bytes_sent_rate"] = None if http else _round(fig.sent, 1)
    out["bytes_received_rate"] = None if http else _round(fig.received, 1)
    return out


def _links(builder: _Builder, edges: list[tuple[_Key, _Figures, list[str]]]) -> list[dict[str, Any]]:
    merged: dict[tuple[str, str], _Figures] = defaultdict(_Figures)
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    protocols: dict[tuple[str, str], set[str]] = defaultdict(set)
    for key, fig, path in edges:
        for a, b in zip(path, path[1:], strict=False):
            link = merged[(a, b)]
            members[(a, b)].append(_edge_id(key))
            protocols[(a, b)].add(key.protocol)
            link.rate += fig.rate
            link.error_rate += fig.error_rate
            link.requests += fig.requests
            link.errors += fig.errors
            link.add_buckets(fig.buckets)
            link.connection_rate += fig.connection_rate
            link.sent += fig.sent
            link.received += fig.received
            # Into and through a waypoint the edge's own security; out of it, the destination agent's report.
            hop = builder.hops_out.get((a, b)) if a.startswith("waypoint:") else None
            link.security |= hop if hop is not None else (fig.security if not a.startswith("waypoint:") else set())
    out = []
    for (a, b), fig in sorted(merged.items()):
        http = "http" in protocols[(a, b)]
        out.append({
            "id": f"{a}>{b}", "source": a, "target": b, "edges": members[(a, b)],
            "protocols": sorted(protocols[(a, b)]),
            "mtls": (fig.security == {MUTUAL_TLS}) if fig.security else None,
            "rate": _round(fig.rate), "requests": round(fig.requests), "errors": round(fig.errors),
            "error_rate": _round(fig.error_rate / fig.rate) if fig.rate > 0 else 0.0,
            "p99": fig.quantiles()["p99"] if http else None,
            "connection_rate": _round(fig.connection_rate), "bytes_rate": _round(fig.sent + fig.received, 1),
        })
    return out


def build(namespace: str, results: Mapping[str, Sequence[Sample]], waypoints: Iterable[WaypointRef] = (),
          window: str = DEFAULT_WINDOW) -> dict[str, Any]:
    """The graph of `namespace` from the answers to `queries(namespace, window)`."""
    builder = _Builder(list(waypoints))
    builder.http(results)
    builder.tcp(results)
    edges = sorted(((k, f, builder.path(k)) for k, f in builder.edges.items()), key=lambda e: _edge_id(e[0]))
    used = {node for _, _, path in edges for node in path}
    nodes = [dict(n, in_namespace=n["namespace"] == namespace) for i, n in sorted(builder.nodes.items()) if i in used]
    return {"namespace": namespace, "window": window, "nodes": nodes,
            "edges": [_edge_json(k, f, p) for k, f, p in edges], "links": _links(builder, edges)}
