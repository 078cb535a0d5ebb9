"""`security.istio.io` kinds: AuthorizationPolicy, PeerAuthentication, RequestAuthentication.

`action: CUSTOM` (an external authorizer) is accepted by the model so that existing manifests apply, but
neither node agents nor waypoints implement it: translation reports it as unsupported and the policy is
enforced by nobody (the control plane logs it).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from mesh.api.errors import FieldError
from mesh.api.names import label_selector
from mesh.api.schema import (
    Bool,
    Enum,
    Errors,
    ListOf,
    MapOf,
    Obj,
    Str,
    check_cidr,
    check_port_string,
    child,
    positive_duration,
    strings,
)
from mesh.api.waypoint_support import check_jwt_rule

# `when` condition keys an AuthorizationPolicy may use; the bracketed ones take any name inside.
WHEN_KEYS = (
    "source.ip", "remote.ip", "source.namespace", "source.principal",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
    "destination.ip", "destination.port", "connection.sni",
)
WHEN_KEY_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")
_BRACKETED = re.compile(r"^(request\.headers|request\.auth\.claims)\[[^\[\]]+\](\[[^\[\]]+\])*$")


def _check_when_key(value: str, path: str, errors: Errors) -> None:
    if value in WHEN_KEYS or value.startswith("experimental.envoy.filters."):
        return
    if any(value.startswith(p) for p in WHEN_KEY_PREFIXES):
        if not _BRACKETED.match(value):
            errors.append(FieldError(path, f"{value!r} is malformed: write request.headers[NAME] or request.auth.claims[NAME]"))
        return
    errors.append(FieldError(path, f"{value!r} is not a supported condition key (use one of {', '.join(WHEN_KEYS)}, "
                                   "request.headers[NAME] or request.auth.claims[NAME])"))


def _check_when(value: dict[str, Any], path: str, errors: Errors) -> None:
    if not value.get("values") and not value.get("notValues"):
        errors.append(FieldError(path, "set values or notValues"))
        return
    key = value["key"]
    if key in ("source.ip", "remote.ip", "destination.ip"):
        for field in ("values", "notValues"):
            for i, v in enumerate(value.get(field) or []):
                check_cidr(v, f"{child(path, field)}[{i}]", errors)
    if key == "destination.port":
        for field in ("values", "notValues"):
            for i, v in enumerate(value.get(field) or []):
                check_port_string(v, f"{child(path, field)}[{i}]", errors)


SOURCE = Obj(
    {
        "principals": strings(),
        "notPrincipals": strings(),
        "requestPrincipals": strings(),
        "notRequestPrincipals": strings(),
        "namespaces": strings(),
        "notNamespaces": strings(),
        "ipBlocks": strings(item=Str(checks=[check_cidr])),
        "notIpBlocks": strings(item=Str(checks=[check_cidr])),
        "remoteIpBlocks": strings(item=Str(checks=[check_cidr])),
        "notRemoteIpBlocks": strings(item=Str(checks=[check_cidr])),
    }
)

_PORT_STRINGS = strings(item=Str(checks=[check_port_string]))

OPERATION = Obj(
    {
        "hosts": strings(),
        "notHosts": strings(),
        "ports": _PORT_STRINGS,
        "notPorts": _PORT_STRINGS,
        "methods": strings(),
        "notMethods": strings(),
        "paths": strings(),
        "notPaths": strings(),
    }
)

RULE = Obj(
    {
        "from": ListOf(Obj({"source": SOURCE}, required=["source"])),
        "to": ListOf(Obj({"operation": OPERATION}, required=["operation"])),
        "when": ListOf(Obj({"key": Str(nonempty=True, checks=[_check_when_key]), "values": strings(),
                            "notValues": strings()}, required=["key"], checks=[_check_when])),
    }
)

TARGET_REF = Obj(
    {"group": Str(), "kind": Str(nonempty=True), "name": Str(nonempty=True), "namespace": Str()},
    required=["kind", "name"],
)


def _check_authz(value: dict[str, Any], path: str, errors: Errors) -> None:
    action = value.get("action", "ALLOW")
    if action == "CUSTOM" and not value.get("provider"):
        errors.append(FieldError(child(path, "provider"), "is required when action is CUSTOM"))
    if action != "CUSTOM" and value.get("provider"):
        errors.append(FieldError(child(path, "provider"), "is only allowed when action is CUSTOM"))
    if action == "DENY" and value.get("rules") == []:
        pass  # an empty DENY denies nothing; legal, as in Istio


def _targets(value: dict[str, Any], path: str, errors: Errors) -> None:
    present = [k for k in ("selector", "targetRef", "targetRefs") if value.get(k) is not None]
    if len(present) > 1:
        errors.append(FieldError(path, f"set only one of selector, targetRef, targetRefs (found {', '.join(present)})"))


AUTHORIZATION_POLICY_SPEC = Obj(
    {
        "selector": label_selector(),
        "targetRef": TARGET_REF,
        "targetRefs": ListOf(TARGET_REF, min_items=1),
        "action": Enum(("ALLOW", "DENY", "AUDIT", "CUSTOM")),
        "provider": Obj({"name": Str(nonempty=True)}, required=["name"]),
        "rules": ListOf(RULE),
    },
    checks=[_targets, _check_authz],
)

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


def _check_port_key(value: str, path: str, errors: Errors) -> None:
    check_port_string(value, path, errors)


def _check_peer_authn(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("portLevelMtls") and not value.get("selector"):
        errors.append(FieldError(child(path, "portLevelMtls"), "needs a selector: port-level mTLS applies to selected workloads only"))


PEER_AUTHENTICATION_SPEC = Obj(
    {
        "selector": label_selector(),
        "mtls": Obj({"mode": Enum(MTLS_MODES)}),
        "portLevelMtls": MapOf(Obj({"mode": Enum(MTLS_MODES)}), key=_check_port_key, int_keys=True),
    },
    checks=[_check_peer_authn],
)


def _check_url(value: str, path: str, errors: Errors) -> None:
    url = urlparse(value)
    if url.scheme not in ("http", "https") or not url.netloc:
        errors.append(FieldError(path, f"{value!r} is not an http(s) URL"))


JWT_RULE = Obj(
    {
        "issuer": Str(nonempty=True),
        "audiences": strings(),
        "jwksUri": Str(nonempty=True, checks=[_check_url]),
        "jwks": Str(nonempty=True),
        "fromHeaders": ListOf(Obj({"name": Str(nonempty=True), "prefix": Str()}, required=["name"])),
        "fromParams": strings(),
        "fromCookies": strings(),
        "outputPayloadToHeader": Str(nonempty=True),
        "outputClaimToHeaders": ListOf(Obj({"header": Str(nonempty=True), "claim": Str(nonempty=True)},
                                           required=["header", "claim"])),
        "forwardOriginalToken": Bool(),
        "timeout": positive_duration(),
    },
    required=["issuer"],
    checks=[check_jwt_rule],  # what a waypoint can use: mesh.api.waypoint_support
)

REQUEST_AUTHENTICATION_SPEC = Obj(
    {
        "selector": label_selector(),
        "targetRef": TARGET_REF,
        "targetRefs": ListOf(TARGET_REF, min_items=1),
        "jwtRules": ListOf(JWT_RULE),
    },
    checks=[_targets],
)

SECURITY_KINDS = {
    "AuthorizationPolicy": AUTHORIZATION_POLICY_SPEC,
    "PeerAuthentication": PEER_AUTHENTICATION_SPEC,
    "RequestAuthentication": REQUEST_AUTHENTICATION_SPEC,
}
