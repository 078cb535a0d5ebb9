"""Traces for the page: recent traces and one trace as a waterfall of spans across proxies.

Where spans come from (a `TraceSource`):

- `ReceivedTraces`: what the dashboard's own OTLP/HTTP receiver took in (`mesh.tracing.receiver.TraceStore`),
  when the cluster's proxies export to it (no other collector is configured);
- `JaegerTraces`: a Jaeger query service (`GET /api/traces?service=...`, `/api/services`), for a
  cluster that exports to a Jaeger collector; an unreachable one is a `SourceError` (a banner).

Pure (tested with canned spans): `proxy_of` (which proxy reported a span: `waypoint bookinfo/waypoint`,
`nodeagent node-1`), `service_of` (the mesh service a span is about, from Envoy-style names
`<host>:<port>/*`, `destination.service`, `upstream_cluster`), `summary` and `waterfall` (spans ordered
depth-first under their parents, each with its offset from the trace's start), `parse_jaeger`.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from mesh.serve import client
from mesh.serve.errors import ServeError
from mesh.tracing.otlp import ReceivedSpan
from mesh.tracing.receiver import TraceStore
from mesh.tracing.span import AttributeValue, StatusCode
from meshctl.dashboard.errors import SourceError

DEFAULT_LIMIT = 20
MAX_LIMIT = 200
TIMEOUT = 3.0
_ENVOY_NAME = re.compile(r"^([^/\s]+?)(?::\d+)?/\*$")
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


# ---- what a span is about (pure) --------------------------------------------------------------------------


def proxy_of(span: ReceivedSpan) -> str:
    """Which proxy reported the span: `waypoint <ns>/<name>`, `nodeagent <node>`, else its service.name."""
    r = span.resource
    instance = str(r.get("service.instance.id") or r.get("k8s.node.name") or "")
    if r.get("istio.proxy") == "waypoint" or str(r.get("service.name", "")).startswith("waypoint."):
        return f"waypoint {instance}" if instance else f"waypoint {span.service}"
    return f"{span.service} {instance}".strip() or "unknown"


def service_of(span: ReceivedSpan) -> str:
    """The mesh service (host) a span is about, "" when it cannot tell."""
    match = _ENVOY_NAME.match(span.name)
    if match:
        return match.group(1)
    attrs = span.attributes
    if attrs.get("destination.service"):
        return str(attrs["destination.service"])
    cluster = str(attrs.get("upstream_cluster") or "")
    if cluster.startswith("outbound|") and cluster.count("|") == 3:
        return cluster.rsplit("|", 1)[1]
    return ""


def short(host: str) -> str:
    """`reviews` for `reviews.bookinfo.svc.cluster.local`; anything else as it is."""
    return host.split(".")[0] if ".svc." in host else host


def _names(span: ReceivedSpan) -> set[str]:
    host = service_of(span)
    return {n for n in (host, short(host), span.service) if n}


def matches(spans: Iterable[ReceivedSpan], service: str) -> bool:
    """Does a trace concern `service` (a short name, a host, or a proxy's service.name)?"""
    return not service or any(service in _names(s) for s in spans)


def _status(span: ReceivedSpan) -> str:
    return "error" if span.status_code == StatusCode.ERROR or span.attributes.get("error") is True else "ok"


def _plain(value: AttributeValue) -> AttributeValue:
    return value


def span_json(span: ReceivedSpan, trace_start: int, depth: int = 0) -> dict[str, Any]:
    host = service_of(span)
    return {
        "span_id": span.span_id, "parent_id": span.parent_span_id or None, "name": span.name,
        "service": short(host) if host else "", "host": host, "proxy": proxy_of(span),
        "kind": KINDS.get(span.kind, str(span.kind)), "start": span.start_ns / 1e6,  # unix milliseconds
        "offset": round((span.start_ns - trace_start) / 1e6, 3), "duration": round(span.duration_ms, 3),
        "status": _status(span), "message": span.status_message, "depth": depth,
        "attributes": {k: _plain(v) for k, v in sorted(span.attributes.items())},
    }


def waterfall(spans: Sequence[ReceivedSpan]) -> list[dict[str, Any]]:
    """The spans depth-first under their parents (siblings by start); a span whose parent was not
    received starts a tree of its own."""
    if not spans:
        return []
    start = min(s.start_ns for s in spans)
    ids = {s.span_id for s in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    roots = []
    for s in sorted(spans, key=lambda s: (s.start_ns, s.span_id)):
        if s.parent_span_id and s.parent_span_id in ids and s.parent_span_id != s.span_id:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(span: ReceivedSpan, depth: int) -> None:
        if span.span_id in seen:  # a loop of parents: each span once
            return
        seen.add(span.span_id)
        out.append(span_json(span, start, depth))
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    for s in spans:  # spans only reachable through a loop
        if s.span_id not in seen:
            walk(s, 0)
    return out


def summary(trace_id: str, spans: Sequence[ReceivedSpan]) -> dict[str, Any]:
    """One trace for the list: when, how long, what it crossed, and its spans."""
    flow = waterfall(spans)
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    root = next((s for s in flow if s["depth"] == 0), None)
    return {
        "trace_id": trace_id, "start": start / 1e6, "duration": round((end - start) / 1e6, 3),
        "root": root["name"] if root else "", "span_count": len(spans),
        "services": sorted({s["service"] for s in flow if s["service"]}),
        "proxies": sorted({s["proxy"] for s in flow}), "errors": sum(1 for s in flow if s["status"] == "error"),
        "spans": flow,
    }


# ---- sources ------------------------------------------------------------------------------------------------


class TraceSource(Protocol):
    where: str

    def recent(self, service: str, limit: int) -> list[tuple[str, list[ReceivedSpan]]]:
        """Recent traces (newest first) that concern `service` ("" for any)."""
        ...

    def trace(self, trace_id: str) -> list[ReceivedSpan]: ...


class ReceivedTraces:
    """The dashboard's own receiver's store."""

    def __init__(self, store: TraceStore, where: str) -> None:
        self.store = store
        self.where = where

    def recent(self, service: str, limit: int) -> list[tuple[str, list[ReceivedSpan]]]:
        out = []
        for s in self.store.traces():
            spans = self.store.trace(s.trace_id)
            if spans and matches(spans, service):
                out.append((s.trace_id, spans))
                if len(out) >= limit:
                    break
        return out

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return self.store.trace(trace_id)


def _tags(tags: Iterable[Mapping[str, Any]]) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for t in tags:
        value = t.get("value")
        out[str(t.get("key"))] = value if isinstance(value, str | bool | int | float) else str(value)
    return out


def parse_jaeger(data: Mapping[str, Any]) -> list[tuple[str, list[ReceivedSpan]]]:
    """The traces of a Jaeger query answer (`{"data": [{traceID, spans, processes}]}`)."""
    out = []
    for t in data.get("data") or []:
        processes = {pid: {"service.name": p.get("serviceName", ""), **_tags(p.get("tags") or [])}
                     for pid, p in (t.get("processes") or {}).items()}
        spans = []
        for s in t.get("spans") or []:
            tags = _tags(s.get("tags") or [])
            parent = next((r.get("spanID", "") for r in s.get("references") or []
                           if r.get("refType") == "CHILD_OF"), "")
            start_ns = int(s.get("startTime", 0)) * 1000
            kind = {"server": 2, "client": 3}.get(str(tags.get("span.kind", "")), 1)
            spans.append(ReceivedSpan(
                trace_id=str(s.get("traceID", t.get("traceID", ""))).rjust(32, "0"), span_id=str(s.get("spanID", "")),
                parent_span_id=str(parent), name=str(s.get("operationName", "")), kind=kind, start_ns=start_ns,
                end_ns=start_ns + int(s.get("duration", 0)) * 1000, attributes=tags,
                resource=dict(processes.get(s.get("processID"), {})),
                status_code=int(StatusCode.ERROR) if tags.get("error") is True else 0))
        if spans:
            out.append((spans[0].trace_id, spans))
    out.sort(key=lambda item: -min(s.start_ns for s in item[1]))
    return out


class JaegerTraces:
    """A Jaeger query service (its HTTP API, as its UI reads it)."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise SourceError("traces", f"--jaeger-url {url!r}: give the query service's http URL, "
                                        "e.g. http://127.0.0.1:16686")
        self.endpoint = client.Endpoint.tcp(parts.hostname, parts.port or 16686)
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self.where = f"Jaeger at {url}"

    def _get(self, path: str, params: Mapping[str, str]) -> Mapping[str, Any]:
        target = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            reply = client.get(self.endpoint, target, timeout=self.timeout)
            answer = reply.json()
        except ServeError as exc:
            raise SourceError("traces", f"{self.where} is unreachable ({exc}): is the query service running?") from None
        except ValueError:
            raise SourceError("traces", f"{self.where} answered something that is not JSON") from None
        if reply.status != 200 or not isinstance(answer, dict):
            raise SourceError("traces", f"{self.where} answered {reply.status}")
        return answer

    def recent(self, service: str, limit: int) -> list[tuple[str, list[ReceivedSpan]]]:
        # Jaeger's `service` is the reporter's service.name (the proxies here), not the mesh service a span
        # is about: ask for every reporter's traces and keep those that concern `service`.
        services = [str(s) for s in self._get("/api/services", {}).get("data") or []]
        out: dict[str, list[ReceivedSpan]] = {}
        for name in services:
            for trace_id, spans in parse_jaeger(self._get("/api/traces", {"service": name, "limit": str(limit),
                                                                          "lookback": "1h"})):
                out.setdefault(trace_id, spans)
        found = sorted(out.items(), key=lambda item: -min(s.start_ns for s in item[1]))
        return [t for t in found if matches(t[1], service)][:limit]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        found = parse_jaeger(self._get(f"/api/traces/{urllib.parse.quote(trace_id)}", {}))
        return found[0][1] if found else []
