"""`meshctl agent services NODE` and `meshctl agent connections NODE`: two more of ztunnel-config's views.

    services      the services the agent knows (its `/config_dump`): hostname, addresses, ports, waypoint,
                  endpoints (healthy/all)
    connections   the TCP connections the agent has proxied, by reporter, source and destination workload:
                  open now (opened minus closed), opened and closed since it started, and bytes each way.
                  Read from its Prometheus endpoint (Istio's `istio_tcp_*` metrics, port 15020 of the node),
                  which is what the agent itself counts; it keeps no per-connection table.

Rendering is pure (dicts in, text out); `meshctl.agent` fetches.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshctl.cluster import table

OPENED, CLOSED = "istio_tcp_connections_opened", "istio_tcp_connections_closed"
RECEIVED, SENT = "istio_tcp_received_bytes", "istio_tcp_sent_bytes"


def _waypoint(s: dict[str, Any]) -> str:
    gw = s.get("waypoint") or {}
    if gw.get("name"):
        return f"{gw.get('namespace', '')}/{gw['name']}"
    return (gw.get("hostname") or {}).get("hostname") or (gw.get("address") or {}).get("address") or "-"


def _ports(s: dict[str, Any]) -> str:
    out = []
    for p in s.get("ports", []):
        port, target = p.get("service_port", 0), p.get("target_port", 0)
        out.append(f"{port}" + (f"->{target}" if target and target != port else "") +
                   (f"/{p['app_protocol']}" if p.get("app_protocol") else ""))
    return ",".join(out) or "-"


def _service_name(s: dict[str, Any]) -> str:
    """The service's name; a ServiceEntry host says so, with its resolution and location."""
    name = s.get("name", "") or "-"
    if s.get("source_kind") != "ServiceEntry":
        return name
    resolution = str(s.get("resolution", "RESOLUTION_STATIC")).removeprefix("RESOLUTION_")
    where = "external" if s.get("mesh_external") else "internal"
    return f"{name} (serviceentry/{s.get('source_name', '?')}: {resolution}, {where})"


def render_services(data: dict[str, Any]) -> str:
    services = sorted(data.get("services", []), key=lambda s: (s.get("namespace", ""), s.get("hostname", "")))
    head = f"{len(services)} services known to the agent of {data.get('node') or '?'}"
    if not services:
        return head
    rows = []
    for s in services:
        endpoints = s.get("endpoints", [])
        healthy = sum(1 for e in endpoints if e.get("healthy"))
        rows.append([s.get("namespace", ""), _service_name(s), ",".join(s.get("vips", [])) or "-",
                     _ports(s), _waypoint(s), f"{healthy}/{len(endpoints)}"])
    return head + "\n" + table(["NAMESPACE", "SERVICE", "VIP", "PORTS", "WAYPOINT", "ENDPOINTS"], rows)


def connection_rows(metrics_text: str) -> list[dict[str, Any]]:
    """Per (reporter, source, destination, service): opened, closed, open, bytes received and sent."""
    totals: dict[tuple[str, str, str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counters = {f"{name}_total": name for name in (OPENED, CLOSED, RECEIVED, SENT)}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = counters.get(sample.name)  # not the `_created` timestamps
            if name is None:
                continue
            lb = sample.labels
            key = (lb.get("reporter", "?"),
                   f"{lb.get('source_workload_namespace', '?')}/{lb.get('source_workload', '?')}",
                   f"{lb.get('destination_workload_namespace', '?')}/{lb.get('destination_workload', '?')}",
                   lb.get("destination_service", "unknown"))
            totals[key][name] += sample.value
    rows = []
    for (reporter, src, dst, service), t in sorted(totals.items()):
        rows.append({"reporter": reporter, "source": src, "destination": dst, "service": service,
                     "open": int(t[OPENED] - t[CLOSED]), "opened": int(t[OPENED]), "closed": int(t[CLOSED]),
                     "received_bytes": int(t[RECEIVED]), "sent_bytes": int(t[SENT])})
    return rows


def render_connections(node: str, rows: list[dict[str, Any]]) -> str:
    head = f"{len(rows)} source/destination pairs proxied by the agent of {node}"
    if not rows:
        return head
    direction = {"source": "outbound", "destination": "inbound"}
    return head + "\n" + table(
        ["DIRECTION", "SOURCE", "DESTINATION", "SERVICE", "OPEN", "OPENED", "CLOSED", "BYTES IN", "BYTES OUT"],
        [[direction.get(r["reporter"], r["reporter"]), r["source"], r["destination"], r["service"], str(r["open"]),
          str(r["opened"]), str(r["closed"]), str(r["received_bytes"]), str(r["sent_bytes"])] for r in rows])
