"""`gateway.networking.k8s.io` Gateway, and the waypoint Gateway exactly as istioctl writes it.

A Gateway with `gatewayClassName: istio-waypoint` is a waypoint.  Its label `istio.io/waypoint-for`
(service, workload, all or none; `service` when absent) says which traffic it takes.  Namespaces,
services and pods choose a waypoint with the label `istio.io/use-waypoint=<gateway name>` (and
`istio.io/use-waypoint-namespace=<ns>` when the waypoint lives elsewhere).
"""

from __future__ import annotations

from typing import Any

from mesh import defaults
from mesh.api.errors import FieldError
from mesh.api.names import check_dns1123_label, labels
from mesh.api.schema import AnyValue, Enum, Errors, ListOf, MapOf, Obj, Str, child, port

WAYPOINT_CLASS = "istio-waypoint"
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


def _check_protocol(value: str, path: str, errors: Errors) -> None:
    if value in _PROTOCOLS or ("/" in value and value.rsplit("/", 1)[1]):
        return
    Enum(_PROTOCOLS).check(value, path, errors)


LISTENER = Obj(
    {
        "name": Str(nonempty=True, checks=[check_dns1123_label]),
        "hostname": Str(),
        "port": port(),
        "protocol": Str(nonempty=True, checks=[_check_protocol]),
        "tls": AnyValue(),
        "allowedRoutes": AnyValue(),
    },
    required=["name", "port", "protocol"],
)


def _check_gateway(value: dict[str, Any], path: str, errors: Errors) -> None:
    listeners = value.get("listeners") or []
    names = [entry.get("name") for entry in listeners]
    for i, name in enumerate(names):
        if name in names[:i]:
            errors.append(FieldError(f"{child(path, 'listeners')}[{i}].name", f"listener name {name!r} is used twice"))
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
