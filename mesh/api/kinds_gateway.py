"""`gateway.networking.k8s.io` Gateway, and the waypoint Gateway exactly as istioctl writes it.

A Gateway with `gatewayClassName: istio-waypoint` is a waypoint.  Its label `istio.io/waypoint-for`
(service, workload, all or none; `service` when absent) says which traffic it takes.  Namespaces,
services and pods choose a waypoint with the label `istio.io/use-waypoint=<gateway name>` (and
`istio.io/use-waypoint-namespace=<ns>` when the waypoint lives elsewhere).

A Gateway with `gatewayClassName: istio` is an ingress gateway: listeners HTTP, and HTTPS terminated with
a certificate from a `kubernetes.io/tls` Secret (`tls.certificateRefs`), each with an optional `hostname`
and `allowedRoutes` (namespaces Same, All or Selector by `matchLabels`; kinds HTTPRoute, GRPCRoute).
Its pods run as the service account `<gateway>-istio`, as Istio names it.
"""

from __future__ import annotations

import re
from typing import Any

from mesh import defaults
from mesh.api.errors import FieldError
from mesh.api.names import check_dns1123_label, labels
from mesh.api.schema import AnyValue, Enum, Errors, ListOf, MapOf, Obj, Str, child, port

WAYPOINT_CLASS = "istio-waypoint"
INGRESS_CLASS = "istio"  # an ingress Gateway (`controlplane.translate.ingress`)
GATEWAY_GROUP = "gateway.networking.k8s.io"
WAYPOINT_PORT = defaults.HBONE_PORT
WAYPOINT_LISTENER = "mesh"
DEFAULT_WAYPOINT_NAME = "waypoint"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"

WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")

_PROTOCOLS = ("HTTP", "HTTPS", "TLS", "TCP", "UDP", "HBONE")
INGRESS_PROTOCOLS = ("HTTP", "HTTPS")  # what an ingress Gateway of this mesh serves
ROUTE_NAMESPACES = ("Same", "All", "Selector")
_LISTENER_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_protocol(value: str, path: str, errors: Errors) -> None:
    if value in _PROTOCOLS or ("/" in value and value.rsplit("/", 1)[1]):
        return
    Enum(_PROTOCOLS).check(value, path, errors)


def _check_listener_hostname(value: str, path: str, errors: Errors) -> None:
    if len(value) > 253 or not _LISTENER_HOSTNAME.match(value):
        errors.append(FieldError(path, f"{value!r} is not a listener hostname: use a lower-case DNS name such as "
                                       "shop.example.com or *.example.com (no IP address, no port)"))


def _check_route_namespaces(value: dict[str, Any], path: str, errors: Errors) -> None:
    selector = value.get("selector")
    if value.get("from", "Same") == "Selector" and not selector:
        errors.append(FieldError(child(path, "selector"), "is required when from is Selector"))
    elif selector and value.get("from", "Same") != "Selector":
        errors.append(FieldError(child(path, "selector"), f"must not be set when from is {value.get('from', 'Same')} "
                                                          "(set from: Selector)"))


# Gateway API `allowedRoutes`: from which namespaces (`Same` by default) and of which kinds routes attach.
ALLOWED_ROUTES = Obj(
    {
        "namespaces": Obj({"from": Enum(ROUTE_NAMESPACES),
                           "selector": Obj({"matchLabels": labels(), "matchExpressions": ListOf(AnyValue())})},
                          checks=[_check_route_namespaces]),
        "kinds": ListOf(Obj({"group": Str(), "kind": Str(nonempty=True)}, required=["kind"])),
    }
)

CERTIFICATE_REF = Obj(
    {"group": Str(), "kind": Str(nonempty=True), "name": Str(nonempty=True), "namespace": Str(nonempty=True)},
    required=["name"],
)

LISTENER_TLS = Obj(
    {
        "mode": Enum(("Terminate", "Passthrough")),
        "certificateRefs": ListOf(CERTIFICATE_REF),
        "options": MapOf(Str()),
        "frontendValidation": AnyValue(),
    }
)

LISTENER = Obj(
    {
        "name": Str(nonempty=True, checks=[check_dns1123_label]),
        "hostname": Str(checks=[_check_listener_hostname]),
        "port": port(),
        "protocol": Str(nonempty=True, checks=[_check_protocol]),
        "tls": LISTENER_TLS,
        "allowedRoutes": ALLOWED_ROUTES,
    },
    required=["name", "port", "protocol"],
)


def _check_ingress_listener(entry: dict[str, Any], path: str, errors: Errors) -> None:
    """What an ingress Gateway (`gatewayClassName: istio`) of this mesh serves: HTTP, and HTTPS terminated
    with a certificate from a `kubernetes.io/tls` Secret of the Gateway's own namespace."""
    protocol, tls = entry.get("protocol"), entry.get("tls")
    if protocol not in INGRESS_PROTOCOLS:
        errors.append(FieldError(child(path, "protocol"), f"{protocol!r} is not served by an ingress Gateway of this "
                                 f"mesh: use {' or '.join(INGRESS_PROTOCOLS)}"))
        return
    if protocol == "HTTP" and tls is not None:
        errors.append(FieldError(child(path, "tls"), "must not be set on an HTTP listener (use protocol HTTPS)"))
    if protocol == "HTTP":
        pass
    elif tls is None or not tls.get("certificateRefs"):
        errors.append(FieldError(child(child(path, "tls"), "certificateRefs"),
                                 "an HTTPS listener needs a certificate: name a kubernetes.io/tls Secret"))
    elif tls.get("mode", "Terminate") != "Terminate":
        errors.append(FieldError(child(child(path, "tls"), "mode"), f"{tls['mode']} is not supported: an ingress "
                                 "Gateway of this mesh terminates TLS (mode: Terminate)"))
    else:
        for i, ref in enumerate(tls["certificateRefs"]):
            where = child(child(child(path, "tls"), "certificateRefs"), i)
            if ref.get("group", "") not in ("", "core") or ref.get("kind", "Secret") != "Secret":
                errors.append(FieldError(where, f"{ref.get('kind', 'Secret')} (group {ref.get('group', '')!r}) is "
                                         "not a certificate source: name a Secret (group \"\", kind Secret)"))
    namespaces = (entry.get("allowedRoutes") or {}).get("namespaces") or {}
    if (namespaces.get("selector") or {}).get("matchExpressions"):
        errors.append(FieldError(child(child(child(path, "allowedRoutes"), "namespaces"), "selector") + ".matchExpressions",
                                 "is not supported: select namespaces with matchLabels"))
    for i, kind in enumerate((entry.get("allowedRoutes") or {}).get("kinds") or []):
        if kind.get("group", GATEWAY_GROUP) != GATEWAY_GROUP or kind["kind"] not in ("HTTPRoute", "GRPCRoute"):
            errors.append(FieldError(child(child(child(path, "allowedRoutes"), "kinds"), i),
                                     f"{kind['kind']} is not a route kind an ingress Gateway takes: use HTTPRoute "
                                     "or GRPCRoute (group gateway.networking.k8s.io)"))


def _check_gateway(value: dict[str, Any], path: str, errors: Errors) -> None:
    listeners = value.get("listeners") or []
    names = [entry.get("name") for entry in listeners]
    for i, name in enumerate(names):
        if name in names[:i]:
            errors.append(FieldError(f"{child(path, 'listeners')}[{i}].name", f"listener name {name!r} is used twice"))
    if value.get("gatewayClassName") == INGRESS_CLASS:
        seen: dict[tuple[int, str], int] = {}
        for i, entry in enumerate(listeners):
            where = f"{child(path, 'listeners')}[{i}]"
            _check_ingress_listener(entry, where, errors)
            key = (entry.get("port"), entry.get("hostname") or "")
            if key in seen:
                errors.append(FieldError(where, f"listener {entry.get('name')!r} has the port and hostname of "
                                         f"listener {listeners[seen[key]].get('name')!r}: they conflict"))
            seen.setdefault(key, i)
        protocols: dict[int, str] = {}
        for i, entry in enumerate(listeners):
            other = protocols.setdefault(entry.get("port"), entry.get("protocol"))
            if other != entry.get("protocol"):
                errors.append(FieldError(f"{child(path, 'listeners')}[{i}].protocol", f"port {entry.get('port')} "
                                         f"is already an {other} listener's: one port, one protocol"))
            elif entry.get("protocol") == "HTTPS" and sum(e.get("port") == entry.get("port") for e in listeners) > 1:
                errors.append(FieldError(f"{child(path, 'listeners')}[{i}].port", f"port {entry.get('port')} has "
                                         "another HTTPS listener: choosing a certificate by SNI is not supported, "
                                         "give each HTTPS listener a port of its own"))
    if value.get("gatewayClassName") == WAYPOINT_CLASS and not any(
        entry.get("protocol") == "HBONE" and entry.get("port") == WAYPOINT_PORT for entry in listeners
    ):
        errors.append(FieldError(child(path, "listeners"),
                                 f"a waypoint needs a listener with protocol HBONE on port {WAYPOINT_PORT}"))


GATEWAY_SPEC = Obj(
    {
        "gatewayClassName": Str(nonempty=True, checks=[check_dns1123_label]),
        "listeners": ListOf(LISTENER, min_items=1),
        "addresses": ListOf(Obj({"type": Str(), "value": Str(nonempty=True)}, required=["value"])),
        "infrastructure": Obj({"labels": labels(), "annotations": MapOf(Str()), "parametersRef": AnyValue()}),
    },
    required=["gatewayClassName", "listeners"],
    checks=[_check_gateway],
)

GATEWAY_KINDS = {"Gateway": GATEWAY_SPEC}


def waypoint_gateway(namespace: str, name: str = DEFAULT_WAYPOINT_NAME, waypoint_for: str = "service") -> dict[str, Any]:
    """The waypoint Gateway document, as `istioctl waypoint apply` writes it."""
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": {WAYPOINT_FOR_LABEL: waypoint_for}},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": WAYPOINT_LISTENER, "port": WAYPOINT_PORT, "protocol": "HBONE"}],
        },
    }


def is_waypoint(body: dict[str, Any]) -> bool:
    return body.get("kind") == "Gateway" and (body.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS


def is_ingress(body: dict[str, Any]) -> bool:
    return body.get("kind") == "Gateway" and (body.get("spec") or {}).get("gatewayClassName") == INGRESS_CLASS


def ingress_service_account(gateway_name: str) -> str:
    """The service account of an ingress Gateway's pods, as Istio names it."""
    return f"{gateway_name}-istio"
