"""The waypoint's span for each request (pure helpers; the proxy starts and finishes it).

Every request the waypoint handles starts or continues a trace, as Envoy does for Istio: the incoming
context (W3C or B3, `mesh.tracing.propagation`) is the parent, the sampling decision is the parent's
when it made one, else the waypoint's Telemetry percentage (`RouteTable.tracing`), and the request goes
upstream with the waypoint's own span as the parent of whatever the service does (`request_headers`),
so an application that passes the headers on (bookinfo does) links its calls into one trace.  The
upstream HBONE CONNECT carries the same `traceparent`, and the destination's node agent makes its tunnel
span a child of it.

The span's name and attributes follow Envoy's for Istio: `<service host>:<port>/*`, kind SERVER,
`http.method`, `http.url`, `http.status_code`, `response_flags`, `upstream_cluster`, `guid:x-request-id`,
`istio.canonical_service`, ... and the Telemetry's custom tags; a 5xx or a failed request is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mesh.tracing.propagation import PROPAGATION_HEADERS
from mesh.tracing.sampler import CustomTag
from mesh.tracing.span import Attributes, AttributeValue
from mesh.tracing.tracer import Started
from waypoint.l7.model import Headers, RequestHead, header, without
from waypoint.l7.routing import Cluster

_PROPAGATION = frozenset(PROPAGATION_HEADERS)


def request_headers(headers: Headers, span: Started) -> Headers:
    """`headers` with every propagation header replaced by those of the waypoint's span."""
    return (*without(headers, _PROPAGATION), *span.headers())


def cluster_name(cluster: Cluster | None) -> str:
    """Envoy's name of the upstream cluster, as Istio's spans show it: `outbound|9080|v1|reviews.ns.svc...`."""
    return f"outbound|{cluster.port}|{cluster.subset}|{cluster.hostname}" if cluster is not None else ""


def span_name(head: RequestHead, hostname: str, port: int) -> str:
    """Envoy's default operation name: the route's host and port, `/*` (the path is an attribute)."""
    return f"{hostname or head.authority}:{port}/*" if port else f"{hostname or head.authority}/*"


def custom_tags(tags: tuple[CustomTag, ...], headers: Headers,
                environ: Mapping[str, str] = os.environ) -> list[tuple[str, AttributeValue]]:
    out: list[tuple[str, AttributeValue]] = []
    for tag in tags:
        if tag.kind == "literal":
            out.append((tag.name, tag.value))
        elif tag.kind == "header":
            out.append((tag.name, header(headers, tag.value) or tag.default))
        else:
            out.append((tag.name, environ.get(tag.value, tag.default)))
    return out


def attributes(head: RequestHead, *, status: int, flags: str, upstream_cluster: str, upstream_host: str,
               peer: str, request_bytes: int, response_bytes: int, canonical_service: str, namespace: str,
               tags: tuple[CustomTag, ...] = ()) -> Attributes:
    """The span's attributes, Envoy's names (the ones Jaeger and Zipkin users know from Istio)."""
    attrs: list[tuple[str, AttributeValue]] = [
        ("component", "proxy"),
        ("http.method", head.method),
        ("http.url", f"http://{head.authority}{head.path}"),
        ("http.protocol", head.protocol),
        ("http.status_code", status),
        ("response_flags", flags),
        ("upstream_cluster", upstream_cluster or "-"),
        ("upstream_address", upstream_host or "-"),
        ("peer.address", peer),
        ("request_size", request_bytes),
        ("response_size", response_bytes),
        ("user_agent", head.header("user-agent") or "-"),
        ("guid:x-request-id", head.header("x-request-id") or ""),
        ("istio.canonical_service", canonical_service),
        ("istio.namespace", namespace),
    ]
    attrs += custom_tags(tags, head.headers)
    if failed(status):
        attrs.append(("error", True))
    return tuple(attrs)


def failed(status: int) -> bool:
    """Envoy marks a span an error for a 5xx, or when there was no answer at all."""
    return status >= 500 or status == 0
