"""The status of ingress Gateways (`gatewayClassName: istio`), as the Gateway API defines it: the control
plane's word, computed from the current configuration whenever a Gateway is read (like route status).

- `status.conditions`: `Accepted` (True; the schema already refused what this mesh does not serve) and
  `Programmed`: True once a Ready pod of the Gateway (label `gateway.networking.k8s.io/gateway-name`)
  is published (`PUBLISHED_ANNOTATION`), else False `Pending`; False `Invalid` when no listener can be
  served (every HTTPS listener's certificate unusable and no HTTP listener).
- `status.addresses`: the published address (`IPAddress`), in the local cluster the host's loopback.
- `status.listeners[]`: `name`, `supportedKinds`, `attachedRoutes` (routes accepted there),
  `conditions` `Accepted`, `ResolvedRefs` (False `InvalidCertificateRef` / `RefNotPermitted` for an
  HTTPS listener whose certificate is not usable: `controlplane.translate.ingress.certificate`) and
  `Programmed`, and this mesh's addition `publishedAddress` (`host:port`, where the listener is reached
  from outside: the Gateway API has no field for a published port that differs from the listener's).

The pod's annotation is what the local cluster's controller writes when it publishes the listeners
(`localcluster.ingress`): `<listener>=<host>:<port>` entries, comma-separated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.translate import gatewayapi, ingress
from controlplane.translate.gatewayapi import CONTROLLER, GATEWAY_GROUP, Condition
from controlplane.translate.workloads import DEFAULT_TRUST_DOMAIN, build_index, build_services
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.api.validate import Ref

PUBLISHED_ANNOTATION = "ingress.ambient.mesh/published"


def parse_published(text: str) -> dict[str, str]:
    """`http=127.0.0.1:40123,https=127.0.0.1:40124` -> listener name -> `host:port` (bad entries skipped)."""
    out = {}
    for item in (text or "").split(","):
        name, sep, address = item.strip().partition("=")
        if sep and name and address:
            out[name] = address
    return out


def format_published(addresses: Mapping[str, str]) -> str:
    return ",".join(f"{name}={address}" for name, address in sorted(addresses.items()))


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def published(snapshot: Any, gw: ingress.IngressGateway) -> dict[str, str]:
    """The published address of each listener, from the Gateway's Ready pods (the first that has any)."""
    for pod in snapshot.of_kind("Pod", gw.namespace):
        meta = pod.get("metadata") or {}
        if (meta.get("labels") or {}).get(GATEWAY_NAME_LABEL) != gw.name or not _ready(pod):
            continue
        found = parse_published((meta.get("annotations") or {}).get(PUBLISHED_ANNOTATION, ""))
        if found:
            return found
    return {}


def _attached(views: list[gatewayapi.RouteView]) -> dict[tuple[str, str], int]:
    """(gateway, listener) -> how many routes are accepted there."""
    out: dict[tuple[str, str], int] = {}
    for view in views:
        seen = {(a.gateway, a.listener) for p in view.parents if p.accepted.ok for a in p.attachments}
        for key in seen:
            out[key] = out.get(key, 0) + 1
    return out


def gateway_status(gw: ingress.IngressGateway, snapshot: Any, attached: Mapping[tuple[str, str], int],
                   generation: int) -> dict[str, Any]:
    addresses = published(snapshot, gw)
    listeners = []
    servable = 0
    for li in gw.listeners:
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs", "all references resolved")
        if li.protocol == "HTTPS":
            cert = ingress.certificate(gw, li, snapshot)
            if cert.reason:
                resolved = Condition("ResolvedRefs", False, cert.reason, cert.problem)
        address = addresses.get(li.name, "")
        if not resolved.ok:
            programmed = Condition("Programmed", False, "Invalid", f"not served: {resolved.message}")
        elif address:
            programmed = Condition("Programmed", True, "Programmed", f"published on {address}")
        else:
            programmed = Condition("Programmed", False, "Pending", "waiting for a ready gateway pod")
        servable += resolved.ok
        entry: dict[str, Any] = {
            "name": li.name,
            "supportedKinds": [{"group": GATEWAY_GROUP, "kind": k} for k in li.kinds],
            "attachedRoutes": attached.get((gw.key, li.name), 0),
            "conditions": [Condition("Accepted", True, "Accepted", "listener accepted").to_json(generation),
                           resolved.to_json(generation), programmed.to_json(generation)],
        }
        if address:
            entry["publishedAddress"] = address
        listeners.append(entry)
    hosts = sorted({a.rsplit(":", 1)[0] for a in addresses.values()})
    if not servable:
        programmed = Condition("Programmed", False, "Invalid", "no listener can be served: see the listeners' "
                               "ResolvedRefs conditions")
    elif addresses:
        programmed = Condition("Programmed", True, "Programmed", f"published on {', '.join(hosts)}")
    else:
        programmed = Condition("Programmed", False, "Pending", f"waiting for a ready pod of Gateway {gw.key}")
    return {
        "conditions": [Condition("Accepted", True, "Accepted", f"handled by {CONTROLLER}").to_json(generation),
                       programmed.to_json(generation)],
        "addresses": [{"type": "IPAddress", "value": h} for h in hosts],
        "listeners": listeners,
    }


def gateway_statuses(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> dict[Ref, dict[str, Any]]:
    """The status of every ingress Gateway of `snapshot`, by resource."""
    gateways = ingress.ingress_gateways(snapshot)
    if not gateways:
        return {}
    index = build_index(snapshot, trust_domain)
    attached = _attached(gatewayapi.analyse(snapshot, build_services(index), set(index.waypoints)))
    out = {}
    for gw in gateways.values():
        body = snapshot.get("Gateway", gw.namespace, gw.name) or {}
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        out[Ref("Gateway", gw.namespace, gw.name)] = gateway_status(gw, snapshot, attached, generation)
    return out
