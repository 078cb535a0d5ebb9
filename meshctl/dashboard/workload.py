"""One workload as the page shows it (pure: the cluster's record and the control plane's resources in).

    view(namespace, name, pods=record_pods, resources=control_plane_bodies)
    chart_queries(namespace, name, window)   # -> [(chart, series, PromQL)], run with query_range
    charts(answers)                          # -> [{title, unit, series: [{name, points}]}]

- pods: the cluster's pods of the workload (in the local cluster a workload is its pod), with node,
  address, service account and labels;
- identity: `spiffe://<trust domain>/ns/<ns>/sa/<service account>`;
- services: those whose selector matches the workload's labels; the waypoint it uses (`istio.io/use-waypoint`
  on the pod, else a service of it, else the namespace);
- policies: AuthorizationPolicy, PeerAuthentication and RequestAuthentication that apply, and why: mesh-wide
  (the root namespace, no selector), namespace-wide, `selector` matching its labels, or `targetRefs` naming
  one of its services or its waypoint's Gateway (enforced by the waypoint);
- routes: every VirtualService route (http and tcp) with a destination that reaches it: a host that is one
  of its services and either no subset or a subset whose DestinationRule labels it matches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mesh import defaults
from meshctl.dashboard.prom import Series, quote

POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")
USE_WAYPOINT = "istio.io/use-waypoint"
DATAPLANE_MODE = "istio.io/dataplane-mode"
SUFFIX = ".svc.cluster.local"

Body = Mapping[str, Any]


def _meta(body: Body) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def _spec(body: Body) -> Mapping[str, Any]:
    return body.get("spec") or {}


def _of_kind(resources: Iterable[Body], *kinds: str) -> list[Body]:
    return [r for r in resources if r.get("kind") in kinds]


def fqdn(host: str, namespace: str) -> str:
    """A service host as Istio resolves a short name written in `namespace`."""
    if host.endswith(SUFFIX) or "*" in host:
        return host
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}{SUFFIX}"
    if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
        return f"{parts[0]}.{parts[1]}{SUFFIX}"
    return host


def _host_matches(pattern: str, host: str) -> bool:
    return pattern == host or pattern == "*" or (pattern.startswith("*.") and host.endswith(pattern[1:]))


def _selected(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def services_of(namespace: str, labels: Mapping[str, str], resources: Iterable[Body]) -> list[Body]:
    return [s for s in _of_kind(resources, "Service") if _meta(s).get("namespace") == namespace
            and _selected(_spec(s).get("selector"), labels)]


def _labels(body: Body | None) -> Mapping[str, str]:
    return (_meta(body).get("labels") or {}) if body else {}


def waypoint_of(namespace: str, pod_labels: Mapping[str, str], services: Sequence[Body],
                resources: Iterable[Body]) -> str:
    """The waypoint traffic to the workload passes (`istio.io/use-waypoint`), "" for none."""
    ns_body = next((n for n in _of_kind(resources, "Namespace") if _meta(n).get("name") == namespace), None)
    for labels in (pod_labels, *(_labels(s) for s in services), _labels(ns_body)):
        value = labels.get(USE_WAYPOINT)
        if value:
            return "" if value == "none" else value
    return ""


def _refs(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(spec.get("targetRefs") or []) + ([spec["targetRef"]] if spec.get("targetRef") else [])


def _why(body: Body, namespace: str, labels: Mapping[str, str], service_names: set[str], waypoint: str) -> str:
    spec, ns = _spec(body), _meta(body).get("namespace")
    refs = _refs(spec)
    selector = (spec.get("selector") or {}).get("matchLabels")
    if refs:
        for ref in refs:
            ref_ns = ref.get("namespace") or ns
            if ref_ns != namespace:
                continue
            if ref.get("kind") == "Service" and ref.get("name") in service_names:
                return f"targets service {ref['name']} (enforced by its waypoint)"
            if ref.get("kind") == "Gateway" and waypoint and ref.get("name") == waypoint:
                return f"targets waypoint {ref['name']}"
        return ""
    if selector:
        if ns == namespace and _selected(selector, labels):
            return "selector " + ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return ""
    if ns == defaults.ROOT_NAMESPACE:
        return "mesh-wide"
    return "namespace-wide" if ns == namespace else ""


def policies(namespace: str, labels: Mapping[str, str], services: Sequence[Body], waypoint: str,
             resources: Iterable[Body]) -> list[dict[str, Any]]:
    names = {str(_meta(s).get("name")) for s in services}
    out = []
    for body in _of_kind(resources, *POLICY_KINDS):
        why = _why(body, namespace, labels, names, waypoint)
        if not why:
            continue
        spec = _spec(body)
        entry: dict[str, Any] = {"kind": body["kind"], "namespace": _meta(body).get("namespace"),
                                 "name": _meta(body).get("name"), "applies": why}
        if body["kind"] == "AuthorizationPolicy":
            entry["action"] = spec.get("action") or "ALLOW"
            entry["rules"] = len(spec.get("rules") or [])
        elif body["kind"] == "PeerAuthentication":
            entry["mode"] = (spec.get("mtls") or {}).get("mode") or "UNSET"
        else:
            entry["issuers"] = [r.get("issuer", "") for r in spec.get("jwtRules") or []]
        out.append(entry)
    return sorted(out, key=lambda p: (p["kind"], p["namespace"] or "", p["name"] or ""))


def _subsets(resources: Iterable[Body], host: str) -> dict[str, Mapping[str, str]]:
    out: dict[str, Mapping[str, str]] = {}
    for dr in _of_kind(resources, "DestinationRule"):
        if fqdn(str(_spec(dr).get("host", "")), str(_meta(dr).get("namespace"))) == host:
            for subset in _spec(dr).get("subsets") or []:
                out.setdefault(str(subset.get("name")), subset.get("labels") or {})
    return out


def _match_text(match: Sequence[Mapping[str, Any]] | None) -> str:
    parts = []
    for m in match or []:
        bits = []
        for field in ("uri", "method", "authority", "scheme"):
            if m.get(field):
                how, value = next(iter(m[field].items()))
                bits.append(f"{field} {how} {value}")
        for name, cond in (m.get("headers") or {}).items():
            how, value = next(iter(cond.items()))
            bits.append(f"header {name} {how} {value}")
        if m.get("port"):
            bits.append(f"port {m['port']}")
        parts.append(" and ".join(bits) or "any")
    return " or ".join(parts) or "any"


def routes(labels: Mapping[str, str], services: Sequence[Body], resources: Iterable[Body]) -> list[dict[str, Any]]:
    resources = list(resources)
    hosts = {fqdn(str(_meta(s).get("name")), str(_meta(s).get("namespace"))) for s in services}
    out = []
    for vs in _of_kind(resources, "VirtualService"):
        vs_ns = str(_meta(vs).get("namespace"))
        spec = _spec(vs)
        vs_hosts = [fqdn(str(h), vs_ns) for h in spec.get("hosts") or []]
        for protocol in ("http", "tcp", "tls"):
            for i, route in enumerate(spec.get(protocol) or []):
                for dest in route.get("route") or []:
                    d = dest.get("destination") or {}
                    host = fqdn(str(d.get("host", "")), vs_ns)
                    if host not in hosts:
                        continue
                    subset = d.get("subset")
                    if subset and not _selected(_subsets(resources, host).get(subset), labels):
                        continue
                    extras = [k for k in ("fault", "retries", "timeout", "mirror", "rewrite", "redirect")
                              if route.get(k) is not None]
                    out.append({
                        "virtualservice": f"{vs_ns}/{_meta(vs).get('name')}", "protocol": protocol,
                        "route": route.get("name") or f"{protocol}[{i}]", "hosts": sorted(vs_hosts),
                        "match": _match_text(route.get("match")), "destination": host, "subset": subset or None,
                        "weight": dest.get("weight", 100 if len(route.get("route") or []) == 1 else None),
                        "extras": extras,
                    })
    return out


def view(namespace: str, name: str, pods: Sequence[Mapping[str, Any]], resources: Sequence[Body],
         trust_domain: str = defaults.TRUST_DOMAIN) -> dict[str, Any] | None:
    """The workload `namespace/name`, or None when the cluster has no such pod."""
    mine = [p for p in pods if p.get("namespace") == namespace and p.get("name") == name]
    if not mine:
        return None
    labels: Mapping[str, str] = mine[0].get("labels") or {}
    sa = str(mine[0].get("serviceAccount") or "default")
    services = services_of(namespace, labels, resources)
    waypoint = waypoint_of(namespace, labels, services, resources)
    ns_body = next((n for n in _of_kind(resources, "Namespace") if _meta(n).get("name") == namespace), None)
    mode = labels.get(DATAPLANE_MODE) or _labels(ns_body).get(DATAPLANE_MODE) or "none"
    return {
        "namespace": namespace, "name": name, "labels": dict(labels),
        "identity": f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}", "service_account": sa,
        "dataplane_mode": mode, "waypoint": waypoint or None,
        "pods": [{"name": p.get("name"), "node": p.get("node"), "ip": p.get("ip"), "running": p.get("running"),
                  "waypoint": bool(p.get("waypoint"))} for p in mine],
        "services": [fqdn(str(_meta(s).get("name")), namespace) for s in services],
        "policies": policies(namespace, labels, services, waypoint, resources),
        "routes": routes(labels, services, resources),
    }


# ---- charts -----------------------------------------------------------------------------------------------

# (title, unit, [(series name, PromQL template)]); `{dst}`/`{src}` are the workload's selectors.
CHARTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Inbound requests", "req/s", (
        ("2xx", 'sum(rate(istio_requests_total{{reporter="waypoint",{dst},response_code=~"2.."}}[{w}]))'),
        ("4xx", 'sum(rate(istio_requests_total{{reporter="waypoint",{dst},response_code=~"4.."}}[{w}]))'),
        ("5xx", 'sum(rate(istio_requests_total{{reporter="waypoint",{dst},response_code=~"5..|0"}}[{w}]))'),
    )),
    ("Inbound latency", "ms", (
        ("p50", 'histogram_quantile(0.5, sum by (le) (rate(istio_request_duration_milliseconds_bucket'
                '{{reporter="waypoint",{dst}}}[{w}])))'),
        ("p99", 'histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket'
                '{{reporter="waypoint",{dst}}}[{w}])))'),
    )),
    ("Outbound requests", "req/s", (
        ("all", 'sum(rate(istio_requests_total{{reporter="waypoint",{src}}}[{w}]))'),
        ("5xx", 'sum(rate(istio_requests_total{{reporter="waypoint",{src},response_code=~"5..|0"}}[{w}]))'),
    )),
    ("Inbound TCP", "bytes/s", (
        ("received", 'sum(rate(istio_tcp_received_bytes_total{{reporter="destination",{dst}}}[{w}]))'),
        ("sent", 'sum(rate(istio_tcp_sent_bytes_total{{reporter="destination",{dst}}}[{w}]))'),
    )),
    ("Outbound TCP", "bytes/s", (
        ("sent", 'sum(rate(istio_tcp_received_bytes_total{{reporter="source",{src}}}[{w}]))'),
        ("received", 'sum(rate(istio_tcp_sent_bytes_total{{reporter="source",{src}}}[{w}]))'),
    )),
    ("TCP connections opened", "conn/s", (
        ("inbound", 'sum(rate(istio_tcp_connections_opened_total{{reporter="destination",{dst}}}[{w}]))'),
        ("outbound", 'sum(rate(istio_tcp_connections_opened_total{{reporter="source",{src}}}[{w}]))'),
    )),
)


def chart_queries(namespace: str, name: str, window: str = "1m") -> list[tuple[str, str, str]]:
    """(chart title, series name, PromQL) for every series of the workload's charts."""
    dst = f"destination_workload={quote(name)},destination_workload_namespace={quote(namespace)}"
    src = f"source_workload={quote(name)},source_workload_namespace={quote(namespace)}"
    return [(title, series, expr.format(dst=dst, src=src, w=window))
            for title, _, lines in CHARTS for series, expr in lines]


def charts(answers: Mapping[tuple[str, str], Sequence[Series]]) -> list[dict[str, Any]]:
    """The charts from the answers to `chart_queries` (keyed by (title, series name))."""
    out = []
    for title, unit, lines in CHARTS:
        series = []
        for name, _ in lines:
            found = answers.get((title, name)) or []
            points = [[t, round(v, 4)] for s in found[:1] for t, v in s.points if not math.isnan(v)]
            series.append({"name": name, "points": points})
        out.append({"title": title, "unit": unit, "series": series})
    return out
