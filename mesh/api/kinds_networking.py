"""`networking.istio.io` kinds: VirtualService, DestinationRule, ServiceEntry.

Checks inside one document live here (types, regexes, durations, percentages, weights summing to 100),
with what waypoints support in `mesh.api.waypoint_support`; checks across documents (a subset a VirtualService names must be defined by a DestinationRule) live in
`mesh.api.crossref`.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from mesh.api.errors import FieldError
from mesh.api.names import label_selector, labels
from mesh.api.schema import (
    AnyValue,
    Bool,
    Enum,
    Errors,
    Int,
    ListOf,
    MapOf,
    Obj,
    Str,
    check_cidr,
    check_dns1123_label_or_wildcard_host,
    check_regex,
    child,
    duration,
    percent_double,
    port,
    positive_duration,
    strings,
)
from mesh.api.waypoint_support import check_http_route, check_load_balancer

STRING_MATCH = Obj(
    {"exact": Str(), "prefix": Str(), "regex": Str(checks=[check_regex])},
    one_of=[("exact", "prefix", "regex")],
    exactly_one=True,
)

PERCENT = Obj({"value": percent_double()}, required=["value"])

PORT_SELECTOR = Obj({"number": port()}, required=["number"])

DESTINATION = Obj(
    {"host": Str(nonempty=True), "subset": Str(nonempty=True), "port": PORT_SELECTOR},
    required=["host"],
)

HEADER_OPS = Obj({"set": MapOf(Str()), "add": MapOf(Str()), "remove": strings()})
HEADERS = Obj({"request": HEADER_OPS, "response": HEADER_OPS})

HTTP_MATCH = Obj(
    {
        "name": Str(),
        "uri": STRING_MATCH,
        "scheme": STRING_MATCH,
        "method": STRING_MATCH,
        "authority": STRING_MATCH,
        "headers": MapOf(STRING_MATCH),
        "queryParams": MapOf(STRING_MATCH),
        "withoutHeaders": MapOf(STRING_MATCH),
        "port": port(),
        "sourceLabels": labels(),
        "gateways": strings(),
        "sourceNamespace": Str(nonempty=True),
        "ignoreUriCase": Bool(),
        "statPrefix": Str(),
    }
)


def _check_weights(value: list[dict[str, Any]], path: str, errors: Errors) -> None:
    if len(value) < 2:
        return
    total = sum(int(r.get("weight") or 0) for r in value)
    if total != 100:
        errors.append(FieldError(f"{path}[{len(value) - 1}].weight",
                                 f"the weights of the {len(value)} destinations sum to {total}; they must sum to 100"))


class Routes(ListOf):
    """A list of weighted destinations whose weights must sum to 100 when there are several."""

    def check(self, value: Any, path: str, errors: Errors) -> None:
        before = len(errors)
        super().check(value, path, errors)
        if len(errors) == before:
            _check_weights(value, path, errors)


HTTP_ROUTE_DESTINATION = Obj(
    {"destination": DESTINATION, "weight": Int(0, 100), "headers": HEADERS},
    required=["destination"],
)

HTTP_REDIRECT = Obj(
    {
        "uri": Str(),
        "authority": Str(),
        "port": port(),
        "derivePort": Enum(("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")),
        "scheme": Str(),
        "redirectCode": Int(300, 399),
    }
)

HTTP_REWRITE = Obj(
    {
        "uri": Str(),
        "authority": Str(),
        "uriRegexRewrite": Obj({"match": Str(checks=[check_regex]), "rewrite": Str()}, required=["match", "rewrite"]),
    }
)

HTTP_RETRY = Obj(
    {
        "attempts": Int(0),
        "perTryTimeout": positive_duration(),
        "retryOn": Str(),
        "retryRemoteLocalities": Bool(),
    }
)

FAULT = Obj(
    {
        "delay": Obj(
            {
                "fixedDelay": positive_duration(),
                "exponentialDelay": positive_duration(),
                "percentage": PERCENT,
                "percent": Int(0, 100),
            },
            one_of=[("fixedDelay", "exponentialDelay")],
            exactly_one=True,
        ),
        "abort": Obj(
            {
                "httpStatus": Int(200, 599),
                "grpcStatus": Str(nonempty=True),
                "http2Error": Str(nonempty=True),
                "percentage": PERCENT,
            },
            one_of=[("httpStatus", "grpcStatus", "http2Error")],
            exactly_one=True,
        ),
    }
)

CORS = Obj(
    {
        "allowOrigins": ListOf(STRING_MATCH),
        "allowOrigin": strings(),
        "allowMethods": strings(),
        "allowHeaders": strings(),
        "exposeHeaders": strings(),
        "maxAge": duration(),
        "allowCredentials": Bool(),
        "unmatchedPreflights": Enum(("UNSPECIFIED", "FORWARD", "IGNORE")),
    }
)


def _check_http_route(value: dict[str, Any], path: str, errors: Errors) -> None:
    actions = [k for k in ("route", "redirect", "directResponse", "delegate") if value.get(k) is not None]
    if len(actions) > 1:
        errors.append(FieldError(path, f"set only one of route, redirect, directResponse, delegate (found {', '.join(actions)})"))
    elif not actions:
        errors.append(FieldError(child(path, "route"), "is required (or a redirect or directResponse)"))
    mirrors = [k for k in ("mirror_percent", "mirrorPercent", "mirrorPercentage") if value.get(k) is not None]
    if len(mirrors) > 1:
        errors.append(FieldError(path, f"set only one of {', '.join(mirrors)}"))
    if mirrors and value.get("mirror") is None:
        errors.append(FieldError(child(path, mirrors[0]), "needs mirror: there is nothing to mirror to"))
    if value.get("rewrite") and value.get("redirect"):
        errors.append(FieldError(child(path, "rewrite"), "cannot be combined with redirect"))


HTTP_ROUTE = Obj(
    {
        "name": Str(),
        "match": ListOf(HTTP_MATCH),
        "route": Routes(HTTP_ROUTE_DESTINATION, min_items=1),
        "redirect": HTTP_REDIRECT,
        "directResponse": Obj({"status": Int(200, 599), "body": AnyValue()}, required=["status"]),
        "delegate": Obj({"name": Str(nonempty=True), "namespace": Str()}, required=["name"]),
        "rewrite": HTTP_REWRITE,
        "timeout": duration(),
        "retries": HTTP_RETRY,
        "fault": FAULT,
        "mirror": DESTINATION,
        "mirrors": ListOf(Obj({"destination": DESTINATION, "percentage": PERCENT}, required=["destination"])),
        "mirrorPercentage": PERCENT,
        "mirror_percent": Int(0, 100),
        "mirrorPercent": Int(0, 100),
        "corsPolicy": CORS,
        "headers": HEADERS,
    },
    checks=[_check_http_route, check_http_route],  # the second: what a waypoint supports
)

L4_MATCH_FIELDS = {
    "destinationSubnets": strings(item=Str(checks=[check_cidr])),
    "port": port(),
    "sourceLabels": labels(),
    "gateways": strings(),
    "sourceNamespace": Str(nonempty=True),
}

ROUTE_DESTINATION = Obj({"destination": DESTINATION, "weight": Int(0, 100)}, required=["destination"])

TCP_ROUTE = Obj({"match": ListOf(Obj(dict(L4_MATCH_FIELDS, sourceSubnet=Str(checks=[check_cidr])))),
                 "route": Routes(ROUTE_DESTINATION, min_items=1)}, required=["route"])

TLS_ROUTE = Obj(
    {
        "match": ListOf(Obj(dict(L4_MATCH_FIELDS, sniHosts=strings(min_items=1)), required=["sniHosts"]), min_items=1),
        "route": Routes(ROUTE_DESTINATION, min_items=1),
    },
    required=["match", "route"],
)

HOSTS = strings(min_items=1, item=Str(nonempty=True, checks=[check_dns1123_label_or_wildcard_host]))

VIRTUAL_SERVICE_SPEC = Obj(
    {
        "hosts": HOSTS,
        "gateways": strings(),
        "http": ListOf(HTTP_ROUTE),
        "tcp": ListOf(TCP_ROUTE),
        "tls": ListOf(TLS_ROUTE),
        "exportTo": strings(),
    },
    required=["hosts"],
)

LB_SIMPLE = ("UNSPECIFIED", "ROUND_ROBIN", "LEAST_CONN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH")

LOAD_BALANCER = Obj(
    {
        "simple": Enum(LB_SIMPLE),
        "consistentHash": Obj(
            {
                "httpHeaderName": Str(nonempty=True),
                "httpCookie": Obj({"name": Str(nonempty=True), "path": Str(), "ttl": duration()}, required=["name"]),
                "useSourceIp": Bool(),
                "httpQueryParameterName": Str(nonempty=True),
                "minimumRingSize": Int(0),
                "ringHash": Obj({"minimumRingSize": Int(0)}),
                "maglev": Obj({"tableSize": Int(0)}),
            },
            one_of=[("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")],
        ),
        "localityLbSetting": AnyValue(),
        "warmupDurationSecs": duration(),
    },
    one_of=[("simple", "consistentHash")],
    checks=[check_load_balancer],  # what a waypoint supports
)

CONNECTION_POOL = Obj(
    {
        "tcp": Obj(
            {
                "maxConnections": Int(0),
                "connectTimeout": positive_duration(),
                "tcpKeepalive": Obj({"probes": Int(0), "time": duration(), "interval": duration()}),
                "maxConnectionDuration": duration(),
                "idleTimeout": duration(),
            }
        ),
        "http": Obj(
            {
                "http1MaxPendingRequests": Int(0),
                "http2MaxRequests": Int(0),
                "maxRequestsPerConnection": Int(0),
                "maxRetries": Int(0),
                "idleTimeout": duration(),
                "h2UpgradePolicy": Enum(("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")),
                "useClientProtocol": Bool(),
                "maxConcurrentStreams": Int(0),
            }
        ),
    }
)

OUTLIER_DETECTION = Obj(
    {
        "consecutiveErrors": Int(0),
        "consecutive5xxErrors": Int(0),
        "consecutiveGatewayErrors": Int(0),
        "consecutiveLocalOriginFailures": Int(0),
        "splitExternalLocalOriginErrors": Bool(),
        "interval": positive_duration(),
        "baseEjectionTime": positive_duration(),
        "maxEjectionPercent": Int(0, 100),
        "minHealthPercent": Int(0, 100),
    }
)

CLIENT_TLS = Obj(
    {
        "mode": Enum(("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")),
        "clientCertificate": Str(),
        "privateKey": Str(),
        "caCertificates": Str(),
        "credentialName": Str(),
        "subjectAltNames": strings(),
        "sni": Str(),
        "insecureSkipVerify": Bool(),
    }
)

_POLICY_FIELDS: dict[str, Any] = {
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
    "tls": CLIENT_TLS,
}

TRAFFIC_POLICY = Obj(
    dict(
        _POLICY_FIELDS,
        portLevelSettings=ListOf(Obj(dict(_POLICY_FIELDS, port=PORT_SELECTOR), required=["port"])),
        tunnel=AnyValue(),
        proxyProtocol=AnyValue(),
    )
)


def _check_subset_names(value: list[dict[str, Any]], path: str, errors: Errors) -> None:
    seen: set[str] = set()
    for i, subset in enumerate(value):
        name = subset.get("name")
        if name in seen:
            errors.append(FieldError(f"{path}[{i}].name", f"subset {name!r} is defined twice"))
        seen.add(str(name))


class Subsets(ListOf):
    def check(self, value: Any, path: str, errors: Errors) -> None:
        before = len(errors)
        super().check(value, path, errors)
        if len(errors) == before:
            _check_subset_names(value, path, errors)


SUBSET = Obj(
    {"name": Str(nonempty=True, pattern=r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?",
                 hint="use letters, digits, '-', '_' and '.'"),
     "labels": labels(), "trafficPolicy": TRAFFIC_POLICY},
    required=["name"],
)

DESTINATION_RULE_SPEC = Obj(
    {
        "host": Str(nonempty=True, checks=[check_dns1123_label_or_wildcard_host]),
        "trafficPolicy": TRAFFIC_POLICY,
        "subsets": Subsets(SUBSET),
        "exportTo": strings(),
        "workloadSelector": label_selector(),
    },
    required=["host"],
)


def _check_service_entry(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("resolution") == "STATIC" and not value.get("endpoints") and not value.get("workloadSelector"):
        errors.append(FieldError(child(path, "endpoints"), "are required when resolution is STATIC (or set a workloadSelector)"))
    if value.get("endpoints") and value.get("workloadSelector"):
        errors.append(FieldError(path, "set only one of endpoints, workloadSelector"))
    if value.get("resolution") == "STATIC":
        for i, ep in enumerate(value.get("endpoints") or []):
            address = ep.get("address") if isinstance(ep, dict) else None
            if isinstance(address, str) and address and not is_ip(address):
                errors.append(FieldError(child(child(child(path, "endpoints"), i), "address"),
                                         f"{address!r} must be an IP address when resolution is STATIC "
                                         "(use resolution DNS for a name)"))
    hosts: list[Any] = value["hosts"] if isinstance(value.get("hosts"), list) else []
    if value.get("resolution") in ("DNS", "DNS_ROUND_ROBIN") and not value.get("endpoints") and any(
            isinstance(h, str) and h.startswith("*") for h in hosts):
        errors.append(FieldError(child(path, "hosts"), "a wildcard host cannot be resolved by DNS: list endpoints, "
                                                       "or use resolution NONE"))


def is_ip(text: str) -> bool:
    """`text` is an IPv4 or IPv6 address (not a name, not a range)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


SERVICE_ENTRY_SPEC = Obj(
    {
        "hosts": HOSTS,
        "addresses": strings(item=Str(checks=[check_cidr])),
        "ports": ListOf(
            Obj({"number": port(), "protocol": Enum(("HTTP", "HTTPS", "GRPC", "HTTP2", "MONGO", "TCP", "TLS")),
                 "name": Str(nonempty=True), "targetPort": port()}, required=["number", "name"])
        ),
        "location": Enum(("MESH_EXTERNAL", "MESH_INTERNAL")),
        "resolution": Enum(("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")),
        "endpoints": ListOf(
            Obj(
                {
                    "address": Str(nonempty=True),
                    "ports": MapOf(port()),
                    "labels": labels(),
                    "network": Str(),
                    "locality": Str(),
                    "weight": Int(0),
                    "serviceAccount": Str(),
                },
                # Istio lets an endpoint without an address stand for a remote network's gateway (with
                # `network`); this mesh has one network, so an endpoint needs its address.
                required=["address"],
            )
        ),
        "workloadSelector": Obj({"labels": labels()}),
        "exportTo": strings(),
        "subjectAltNames": strings(),
    },
    required=["hosts"],
    checks=[_check_service_entry],
)

NETWORKING_KINDS = {
    "VirtualService": VIRTUAL_SERVICE_SPEC,
    "DestinationRule": DESTINATION_RULE_SPEC,
    "ServiceEntry": SERVICE_ENTRY_SPEC,
}
