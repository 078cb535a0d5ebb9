"""The mesh's own health (pure): what runs, which configuration each proxy holds, when certificates expire.

    health(record, connections=proxy_status_json, certificates=[(holder, certs_json)], up=samples, now=...)

- components: the control plane, every node agent, every waypoint, Prometheus and the waypoint controller
  of the cluster's record, each with whether its process runs, whether Prometheus' last scrape of it
  worked (`up`), and for the proxies their discovery state as `proxy-status` shows it: SYNCED (everything
  sent was ACKed), STALE (a push not ACKed yet), NACK (a change refused), DISCONNECTED (no stream), with
  the control plane version they last ACKed;
- certificates: every workload certificate each agent (and each waypoint) holds, with its expiry and
  the time left; the soonest first.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshctl.dashboard.prom import Sample

ROLE_WAYPOINT = "waypoint"
SOON = 3600.0  # seconds: a certificate this close to expiry is flagged


def proxy_state(client: Mapping[str, Any]) -> str:
    """SYNCED, STALE or NACK over every type the client subscribed to (`meshctl proxy-status`'s words)."""
    types = list((client.get("types") or {}).values())
    if any(t.get("nack") for t in types):
        return "NACK"
    if any(t.get("pending") for t in types):
        return "STALE"
    return "SYNCED" if client.get("acked_version") else "NOT ACKED"


def _client_for(clients: Sequence[Mapping[str, Any]], kind: str, node: str, namespace: str, name: str) \
        -> Mapping[str, Any] | None:
    for c in clients:
        if kind == "waypoint" and c.get("role") == ROLE_WAYPOINT and c.get("namespace") == namespace \
                and c.get("name") == name:
            return c
        if kind == "nodeagent" and c.get("role") != ROLE_WAYPOINT and c.get("node") == node:
            return c
    return None


def _scraped(up: Sequence[Sample] | None, job: str, **labels: str) -> bool | None:
    if up is None:
        return None
    for s in up:
        if s.labels.get("job") == job and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value == 1
    return None


def components(record: Mapping[str, Any], connections: Mapping[str, Any] | None,
               up: Sequence[Sample] | None) -> list[dict[str, Any]]:
    procs = {p["name"]: p for p in record.get("processes", [])}
    clients = list((connections or {}).get("clients") or [])
    current = (connections or {}).get("version") or ""
    plan = record.get("plan") or {}
    out: list[dict[str, Any]] = []

    def add(kind: str, name: str, process: str, *, node: str = "", namespace: str = "", scraped: bool | None = None,
            proxy: bool = False) -> None:
        p = procs.get(process)
        entry: dict[str, Any] = {"kind": kind, "name": name, "node": node or None, "namespace": namespace or None,
                                 "running": bool(p and p.get("running")) if p else False, "scraped": scraped}
        if proxy:
            c = _client_for(clients, kind, node, namespace, name) if connections is not None else None
            entry["config"] = proxy_state(c) if c else ("DISCONNECTED" if connections is not None else None)
            entry["acked_version"] = (c or {}).get("acked_version") or None
            entry["current"] = bool(c) and (c or {}).get("acked_version") == current
            entry["identity"] = (c or {}).get("identity") or None
        out.append(entry)

    add("controlplane", "istiod", "controlplane", scraped=_scraped(up, "controlplane"))
    for node in plan.get("nodes", []):
        add("nodeagent", f"nodeagent {node['name']}", f"nodeagent {node['name']}", node=node["name"],
            scraped=_scraped(up, "nodeagent", node=node["name"]), proxy=True)
        out[-1]["redirect_mode"] = node.get("redirectMode")
    for pod in plan.get("pods", []):
        if pod.get("waypoint"):
            add("waypoint", pod["name"], f"waypoint {pod['namespace']}/{pod['name']}", node=pod.get("node", ""),
                namespace=pod["namespace"], scraped=_scraped(up, "waypoint", namespace=pod["namespace"], pod=pod["name"]),
                proxy=True)
    if "prometheus" in procs:
        add("prometheus", "prometheus", "prometheus")
    if "controller" in procs:
        add("controller", "waypoint controller", "controller")
    return out


def _parse_time(value: object) -> datetime.datetime | None:
    if not value:
        return None
    try:
        t = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def certificates(held: Iterable[tuple[str, Mapping[str, Any]]], now: datetime.datetime) -> list[dict[str, Any]]:
    """Every certificate each holder (`nodeagent node-1`, `waypoint ns/name`) reports, soonest expiry first."""
    out = []
    for holder, data in held:
        for c in data.get("certificates") or []:
            not_after = _parse_time(c.get("not_after"))
            left = (not_after - now).total_seconds() if not_after else None
            out.append({"holder": holder, "identity": c.get("identity"), "state": str(c.get("state") or "").upper(),
                        "serial": c.get("serial"), "not_after": not_after.isoformat() if not_after else None,
                        "expires_in": round(left) if left is not None else None,
                        "expiring": left is not None and left < SOON, "last_error": c.get("last_error")})
    return sorted(out, key=lambda c: (c["expires_in"] is None, c["expires_in"] or 0, c["holder"], c["identity"] or ""))


def health(record: Mapping[str, Any], *, connections: Mapping[str, Any] | None,
           certs: Iterable[tuple[str, Mapping[str, Any]]], up: Sequence[Sample] | None,
           now: datetime.datetime) -> dict[str, Any]:
    comps = components(record, connections, up)
    return {
        "cluster": record.get("name"),
        "control_plane": {"version": (connections or {}).get("version"),
                          "clients": len((connections or {}).get("clients") or []),
                          "errors": list((connections or {}).get("errors") or [])} if connections is not None else None,
        "components": comps,
        "certificates": certificates(certs, now),
    }
