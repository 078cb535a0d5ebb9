"""Core (`v1`) kinds: Namespace, ServiceAccount, Service, Secret and, in the local cluster, Pod."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from mesh.api.errors import FieldError
from mesh.api.names import check_dns1123_label, labels
from mesh.api.schema import (
    AnyValue,
    Bool,
    Enum,
    Errors,
    Int,
    IntOrStr,
    ListOf,
    MapOf,
    Obj,
    Str,
    check_ip,
    child,
    port,
    strings,
)

NAMESPACE_SPEC = Obj({"finalizers": ListOf(Str())})
NAMESPACE_STATUS = Obj({"phase": Str()})

PROTOCOLS = ("TCP", "UDP", "SCTP")


def _check_service_ports(value: dict[str, Any], path: str, errors: Errors) -> None:
    ports = value.get("ports") or []
    names = [p.get("name") for p in ports]
    if len(ports) > 1:
        for i, p in enumerate(ports):
            if not p.get("name"):
                errors.append(FieldError(child(child(path, "ports"), i) + ".name",
                                         "is required when a service has more than one port"))
    seen: set[Any] = set()
    for i, name in enumerate(names):
        if name and name in seen:
            errors.append(FieldError(child(child(path, "ports"), i) + ".name", f"port name {name!r} is used twice"))
        seen.add(name)
    cip = value.get("clusterIP")
    if cip not in (None, "", "None"):
        check_ip(cip, child(path, "clusterIP"), errors)


SERVICE_PORT = Obj(
    {
        "name": Str(checks=[check_dns1123_label]),
        "port": port(),
        "targetPort": IntOrStr(as_int=port(), as_str=Str(nonempty=True, checks=[check_dns1123_label])),
        "protocol": Enum(PROTOCOLS),
        "appProtocol": Str(),
        "nodePort": port(),
    },
    required=["port"],
)

SERVICE_SPEC = Obj(
    {
        "selector": labels(),
        "ports": ListOf(SERVICE_PORT),
        "clusterIP": Str(),
        "clusterIPs": strings(item=Str(checks=[check_ip])),
        "type": Enum(("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")),
        "externalName": Str(),
        "sessionAffinity": Enum(("None", "ClientIP")),
        "ipFamilies": strings(),
        "ipFamilyPolicy": Str(),
        "publishNotReadyAddresses": Bool(),
        "internalTrafficPolicy": Enum(("Cluster", "Local")),
    },
    checks=[_check_service_ports],
)

CONTAINER = Obj(
    {
        "name": Str(nonempty=True, checks=[check_dns1123_label]),
        "image": Str(),
        "imagePullPolicy": Str(),
        "command": strings(item=Str()),
        "args": strings(item=Str()),
        "env": ListOf(Obj({"name": Str(nonempty=True), "value": Str(), "valueFrom": AnyValue()}, required=["name"])),
        "ports": ListOf(
            Obj(
                {
                    "containerPort": port(),
                    "name": Str(checks=[check_dns1123_label]),
                    "protocol": Enum(PROTOCOLS),
                    "hostPort": port(),
                },
                required=["containerPort"],
            )
        ),
        "workingDir": Str(),
        "resources": AnyValue(),
        "readinessProbe": AnyValue(),
        "livenessProbe": AnyValue(),
        "securityContext": AnyValue(),
        "volumeMounts": AnyValue(),
    },
    required=["name"],
)

POD_SPEC = Obj(
    {
        "nodeName": Str(nonempty=True),
        "serviceAccountName": Str(nonempty=True),
        "serviceAccount": Str(nonempty=True),
        "containers": ListOf(CONTAINER, min_items=1),
        "restartPolicy": Enum(("Always", "OnFailure", "Never")),
        "terminationGracePeriodSeconds": Int(0),
        "hostNetwork": Bool(),
        "volumes": AnyValue(),
        "securityContext": AnyValue(),
    },
    required=["containers"],
)

POD_STATUS = Obj(
    {
        "podIP": Str(checks=[check_ip]),
        "podIPs": ListOf(Obj({"ip": Str(checks=[check_ip])}, required=["ip"])),
        "hostIP": Str(checks=[check_ip]),
        "phase": Enum(("Pending", "Running", "Succeeded", "Failed", "Unknown")),
        "conditions": AnyValue(),
        "containerStatuses": AnyValue(),
        "startTime": AnyValue(),
    }
)

SERVICE_ACCOUNT_EXTRA = {
    "automountServiceAccountToken": Bool(),
    "secrets": ListOf(AnyValue()),
    "imagePullSecrets": ListOf(AnyValue()),
}

_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
TLS_SECRET_TYPE = "kubernetes.io/tls"


def _check_secret_key(value: str, path: str, errors: Errors) -> None:
    if len(value) > 253 or not _SECRET_KEY.match(value):
        errors.append(FieldError(path, f"{value!r} is not a Secret key: use letters, digits, '-', '_' and '.' "
                                       "(like tls.crt)"))


def _check_base64(value: str, path: str, errors: Errors) -> None:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        errors.append(FieldError(path, "is not base64: data values are base64-encoded (put plain text in stringData)"))


# A Secret: what an ingress Gateway's `certificateRefs` name (`type: kubernetes.io/tls`, keys tls.crt and
# tls.key, PEM).  Whether it holds a usable certificate is the Gateway's status (`controlplane.translate.ingress`).
SECRET_EXTRA = {
    "type": Str(nonempty=True),
    "data": MapOf(Str(checks=[_check_base64]), key=_check_secret_key),
    "stringData": MapOf(Str(), key=_check_secret_key),
    "immutable": Bool(),
}

# kind -> (spec schema or None, status schema, extra top-level fields)
CORE_KINDS: dict[str, tuple[Obj | None, Any, dict[str, Any]]] = {
    "Namespace": (NAMESPACE_SPEC, NAMESPACE_STATUS, {}),
    "ServiceAccount": (None, None, SERVICE_ACCOUNT_EXTRA),
    "Service": (SERVICE_SPEC, AnyValue(), {}),
    "Pod": (POD_SPEC, POD_STATUS, {}),
    "Secret": (None, None, SECRET_EXTRA),
}
