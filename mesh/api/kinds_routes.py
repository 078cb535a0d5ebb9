"""`gateway.networking.k8s.io` routes: HTTPRoute and GRPCRoute, as the Gateway API (v1) defines them.

The schema holds what the Gateway API's CRDs and their validation rules hold (types, enums, ranges,
list lengths, "the field named by `type` and no other"), plus what a waypoint supports: no
`ExtensionRef` filters, and a `RequestRedirect` path is `ReplaceFullPath` only.  Which parents and
backends exist is not the schema's business: the control plane reports that in the route's status
(`controlplane.translate.gatewayapi`).
"""

from __future__ import annotations

import re
from typing import Any

from mesh.api.errors import FieldError
from mesh.api.schema import (
    Enum,
    Errors,
    Int,
    ListOf,
    Obj,
    Str,
    check_regex,
    child,
    parse_duration,
    port,
)
from mesh.api.waypoint_support import NOT_SUPPORTED

MAX_WEIGHT = 1_000_000
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_TYPES = ("Exact", "RegularExpression")

# Gateway API durations (GEP-2257): one to four groups of up to five digits and a unit h, m, s or ms.
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


def check_gateway_duration(value: Any, path: str, errors: Errors) -> None:
    if not _GATEWAY_DURATION.match(value):
        errors.append(FieldError(path, f"{value!r} is not a Gateway API duration: write up to four numbers "
                                       "with units h, m, s or ms, like 10s, 500ms or 1m30s"))


def _check_header_name(value: Any, path: str, errors: Errors) -> None:
    if not _HEADER_NAME.match(value):
        errors.append(FieldError(path, f"{value!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"))


def _check_hostname(value: Any, path: str, errors: Errors) -> None:
    if len(value) > 253 or not _HOSTNAME.match(value):
        errors.append(FieldError(path, f"{value!r} is not a hostname: use a lower-case DNS name such as "
                                       "reviews.default.svc.cluster.local or *.example.com (no IP address, no port)"))


def _check_absolute_path(value: Any, path: str, errors: Errors) -> None:
    if not value.startswith("/"):
        errors.append(FieldError(path, f"{value!r} must start with /"))
    elif "//" in value or "/./" in value or "/../" in value or value.endswith(("/.", "/..")):
        errors.append(FieldError(path, f"{value!r} must not contain //, /./ or /../"))


HEADER_NAME = Str(nonempty=True, max_len=256, checks=[_check_header_name])
HEADER_VALUE = Obj({"name": HEADER_NAME, "value": Str(max_len=4096)}, required=["name", "value"])


class UniqueNames(ListOf):
    """A list of items with a `name`, each name (case-insensitive when `fold`) used once."""

    def __init__(self, item: Obj, max_items: int, fold: bool = True) -> None:
        super().__init__(item)
        self.max_items = max_items
        self.fold = fold

    def check(self, value: Any, path: str, errors: Errors) -> None:
        before = len(errors)
        super().check(value, path, errors)
        if len(errors) != before:
            return
        if len(value) > self.max_items:
            errors.append(FieldError(path, f"has {len(value)} items, at most {self.max_items} allowed"))
        seen: set[str] = set()
        for i, item in enumerate(value):
            name = str(item.get("name"))
            key = name.lower() if self.fold else name
            if key in seen:
                errors.append(FieldError(child(child(path, i), "name"), f"{name!r} is listed twice"))
            seen.add(key)


class Bounded(ListOf):
    """A list with at most `max_items` items."""

    def __init__(self, item: Any, max_items: int, min_items: int = 0) -> None:
        super().__init__(item, min_items=min_items)
        self.max_items = max_items

    def check(self, value: Any, path: str, errors: Errors) -> None:
        super().check(value, path, errors)
        if isinstance(value, list) and len(value) > self.max_items:
            errors.append(FieldError(path, f"has {len(value)} items, at most {self.max_items} allowed"))


def _check_header_modifier(value: dict[str, Any], path: str, errors: Errors) -> None:
    seen: dict[str, str] = {}
    for op in ("set", "add"):
        for i, entry in enumerate(value.get(op) or []):
            seen.setdefault(entry["name"].lower(), f"{op}[{i}]")
    for i, name in enumerate(value.get("remove") or []):
        if name.lower() in seen:
            errors.append(FieldError(child(child(path, "remove"), i),
                                     f"{name!r} is also in {seen[name.lower()]}: a header is set, added or removed, "
                                     "not several of these"))
    both = {e["name"].lower() for e in value.get("set") or []} & {e["name"].lower() for e in value.get("add") or []}
    if both:
        errors.append(FieldError(path, f"header {sorted(both)[0]!r} is both in set and in add"))


HEADER_MODIFIER = Obj(
    {
        "set": UniqueNames(HEADER_VALUE, 16),
        "add": UniqueNames(HEADER_VALUE, 16),
        "remove": Bounded(HEADER_NAME, 16),
    },
    checks=[_check_header_modifier],
)


def _check_backend_ref(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("group", "") == "" and value.get("kind", "Service") == "Service" and value.get("port") is None:
        errors.append(FieldError(child(path, "port"), "is required when the backend is a Service"))


BACKEND_OBJECT_FIELDS: dict[str, Any] = {
    "group": Str(max_len=253),
    "kind": Str(nonempty=True, max_len=63),
    "name": Str(nonempty=True, max_len=253),
    "namespace": Str(nonempty=True, max_len=63),
    "port": port(),
}

BACKEND_OBJECT = Obj(BACKEND_OBJECT_FIELDS, required=["name"], checks=[_check_backend_ref])


def _check_fraction(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("denominator", 100) < value["numerator"]:
        errors.append(FieldError(child(path, "numerator"), "must not be larger than the denominator"))


MIRROR = Obj(
    {
        "backendRef": BACKEND_OBJECT,
        "percent": Int(0, 100),
        "fraction": Obj({"numerator": Int(0), "denominator": Int(1)}, required=["numerator"],
                        checks=[_check_fraction]),
    },
    required=["backendRef"],
    one_of=[("percent", "fraction")],
)


def _check_path_modifier(value: dict[str, Any], path: str, errors: Errors) -> None:
    kind = value["type"]
    wanted = {"ReplaceFullPath": "replaceFullPath", "ReplacePrefixMatch": "replacePrefixMatch"}[kind]
    for name in ("replaceFullPath", "replacePrefixMatch"):
        if name != wanted and value.get(name) is not None:
            errors.append(FieldError(child(path, name), f"must not be set when type is {kind} (set {wanted})"))
    if value.get(wanted) is None:
        errors.append(FieldError(child(path, wanted), f"is required when type is {kind}"))


PATH_MODIFIER = Obj(
    {
        "type": Enum(("ReplaceFullPath", "ReplacePrefixMatch")),
        "replaceFullPath": Str(max_len=1024, checks=[_check_absolute_path]),
        "replacePrefixMatch": Str(max_len=1024, checks=[_check_absolute_path]),
    },
    required=["type"],
    checks=[_check_path_modifier],
)


def _check_redirect(value: dict[str, Any], path: str, errors: Errors) -> None:
    if (value.get("path") or {}).get("type") == "ReplacePrefixMatch":
        errors.append(FieldError(child(child(path, "path"), "type"),
                                 f"ReplacePrefixMatch in a redirect {NOT_SUPPORTED}: use ReplaceFullPath"))


REDIRECT = Obj(
    {
        "scheme": Enum(("http", "https")),
        "hostname": Str(checks=[_check_hostname]),
        "path": PATH_MODIFIER,
        "port": port(),
        "statusCode": Int(301, 302),
    },
    checks=[_check_redirect],
)

REWRITE = Obj({"hostname": Str(checks=[_check_hostname]), "path": PATH_MODIFIER})

_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
}


def _filter(types: tuple[str, ...]) -> Obj:
    def check(value: dict[str, Any], path: str, errors: Errors) -> None:
        kind = value["type"]
        wanted = _FILTER_FIELDS[kind]
        if kind == "ExtensionRef":
            errors.append(FieldError(child(path, "type"), f"ExtensionRef {NOT_SUPPORTED}"))
            return
        for name in _FILTER_FIELDS.values():
            if name != wanted and value.get(name) is not None:
                errors.append(FieldError(child(path, name), f"must not be set when type is {kind} (set {wanted})"))
        if value.get(wanted) is None:
            errors.append(FieldError(child(path, wanted), f"is required when type is {kind}"))

    fields: dict[str, Any] = {
        "type": Enum(types),
        "requestHeaderModifier": HEADER_MODIFIER,
        "responseHeaderModifier": HEADER_MODIFIER,
        "requestMirror": MIRROR,
        "extensionRef": Obj({"group": Str(), "kind": Str(nonempty=True), "name": Str(nonempty=True)}),
    }
    if "RequestRedirect" in types:
        fields |= {"requestRedirect": REDIRECT, "urlRewrite": REWRITE}
    return Obj(fields, required=["type"], checks=[check])


HTTP_FILTER_TYPES = tuple(_FILTER_FIELDS)
GRPC_FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef")
HTTP_FILTER = _filter(HTTP_FILTER_TYPES)
GRPC_FILTER = _filter(GRPC_FILTER_TYPES)


def _check_filters(value: list[dict[str, Any]], path: str, errors: Errors) -> None:
    """At most one of each kind but mirrors, and no redirect beside a rewrite."""
    types = [f["type"] for f in value]
    for i, kind in enumerate(types):
        if kind not in ("RequestMirror", "ExtensionRef") and kind in types[:i]:
            errors.append(FieldError(child(child(path, i), "type"), f"{kind} may appear only once in a rule's filters"))
    if "RequestRedirect" in types and "URLRewrite" in types:
        errors.append(FieldError(path, "RequestRedirect and URLRewrite cannot be used together"))


class Filters(ListOf):
    def check(self, value: Any, path: str, errors: Errors) -> None:
        before = len(errors)
        super().check(value, path, errors)
        if isinstance(value, list) and len(value) > 16:
            errors.append(FieldError(path, f"has {len(value)} items, at most 16 allowed"))
        if len(errors) == before:
            _check_filters(value, path, errors)


def _backend_ref(filter_node: Obj) -> Obj:
    return Obj(dict(BACKEND_OBJECT_FIELDS, weight=Int(0, MAX_WEIGHT), filters=Filters(filter_node)),
               required=["name"], checks=[_check_backend_ref])


def _check_value_match(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("type", "Exact") == "RegularExpression":
        check_regex(value["value"], child(path, "value"), errors)


def _value_match(name: Str) -> Obj:
    return Obj({"type": Enum(VALUE_TYPES), "name": name, "value": Str(max_len=4096)},
               required=["name", "value"], checks=[_check_value_match])


def _check_path_match(value: dict[str, Any], path: str, errors: Errors) -> None:
    kind, text = value.get("type", "PathPrefix"), value.get("value", "/")
    if kind == "RegularExpression":
        check_regex(text, child(path, "value"), errors)
    else:
        _check_absolute_path(text, child(path, "value"), errors)


HTTP_MATCH = Obj(
    {
        "path": Obj({"type": Enum(PATH_TYPES), "value": Str(max_len=1024)}, checks=[_check_path_match]),
        "headers": UniqueNames(_value_match(HEADER_NAME), 16),
        "queryParams": UniqueNames(_value_match(Str(nonempty=True, max_len=256)), 16, fold=False),
        "method": Enum(HTTP_METHODS),
    }
)


def _check_http_rule(value: dict[str, Any], path: str, errors: Errors) -> None:
    filters = value.get("filters") or []
    types = [f["type"] for f in filters]
    if "RequestRedirect" in types and value.get("backendRefs"):
        errors.append(FieldError(child(path, "backendRefs"), "must be empty when the rule has a RequestRedirect filter"))
    for i, f in enumerate(filters):
        if f["type"] == "URLRewrite" and ((f.get("urlRewrite") or {}).get("path") or {}).get("type") == "ReplacePrefixMatch":
            matches = value.get("matches") or [{}]
            if any((m.get("path") or {}).get("type", "PathPrefix") != "PathPrefix" for m in matches):
                errors.append(FieldError(child(child(child(path, "filters"), i), "urlRewrite"),
                                         "path.replacePrefixMatch needs every match of the rule to be a PathPrefix path match"))
    timeouts = value.get("timeouts") or {}
    request, backend = timeouts.get("request"), timeouts.get("backendRequest")
    if request and backend and parse_duration(request) > 0 and parse_duration(backend) > parse_duration(request):
        errors.append(FieldError(child(child(path, "timeouts"), "backendRequest"),
                                 f"{backend} is longer than timeouts.request ({request}): it must not be"))


HTTP_RULE = Obj(
    {
        "name": Str(nonempty=True, max_len=253),
        "matches": Bounded(HTTP_MATCH, 64),
        "filters": Filters(HTTP_FILTER),
        "backendRefs": Bounded(_backend_ref(HTTP_FILTER), 16),
        "timeouts": Obj({"request": Str(checks=[check_gateway_duration]),
                         "backendRequest": Str(checks=[check_gateway_duration])}),
    },
    checks=[_check_http_rule],
)


def _check_grpc_method(value: dict[str, Any], path: str, errors: Errors) -> None:
    kind = value.get("type", "Exact")
    if kind == "Exact" and not value.get("service") and not value.get("method"):
        errors.append(FieldError(path, "set service, method or both"))
    for name, pattern in (("service", _GRPC_SERVICE), ("method", _GRPC_METHOD)):
        text = value.get(name)
        if text is None:
            continue
        if kind == "RegularExpression":
            check_regex(text, child(path, name), errors)
        elif not pattern.match(text):
            errors.append(FieldError(child(path, name), f"{text!r} is not a gRPC {name} name"
                                     + (" (like helloworld.Greeter)" if name == "service" else " (like SayHello)")))


GRPC_MATCH = Obj(
    {
        "method": Obj({"type": Enum(VALUE_TYPES), "service": Str(max_len=1024), "method": Str(max_len=1024)},
                      checks=[_check_grpc_method]),
        "headers": UniqueNames(_value_match(HEADER_NAME), 16),
    }
)

GRPC_RULE = Obj(
    {
        "name": Str(nonempty=True, max_len=253),
        "matches": Bounded(GRPC_MATCH, 64),
        "filters": Filters(GRPC_FILTER),
        "backendRefs": Bounded(_backend_ref(GRPC_FILTER), 16),
    }
)

PARENT_REF = Obj(
    {
        "group": Str(max_len=253),
        "kind": Str(nonempty=True, max_len=63),
        "namespace": Str(nonempty=True, max_len=63),
        "name": Str(nonempty=True, max_len=253),
        "sectionName": Str(nonempty=True, max_len=253),
        "port": port(),
    },
    required=["name"],
)


def _route_spec(rule: Obj) -> Obj:
    return Obj(
        {
            "parentRefs": Bounded(PARENT_REF, 32),
            "hostnames": Bounded(Str(nonempty=True, checks=[_check_hostname]), 16),
            "rules": Bounded(rule, 16),
        }
    )


HTTP_ROUTE_SPEC = _route_spec(HTTP_RULE)
GRPC_ROUTE_SPEC = _route_spec(GRPC_RULE)

ROUTE_KINDS = {"HTTPRoute": HTTP_ROUTE_SPEC, "GRPCRoute": GRPC_ROUTE_SPEC}
