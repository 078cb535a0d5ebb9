"""Compiled VirtualService and DestinationRule rules: frozen values built from validated specs.

`compile_virtual_service` and `compile_destination_rule` take a spec as `mesh.api` validated it (camelCase
dicts) and return values the router reads without further checks; anything that cannot be compiled raises
`ConfigError`.  Short hosts are qualified in the resource's namespace (`reviews` in `bookinfo` ->
`reviews.bookinfo.svc.cluster.local`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.api.crossref import fqdn
from mesh.api.schema import parse_duration
from mesh.api.waypoint_support import GRPC_STATUS_CODES
from waypoint.errors import ConfigError

INFINITE = 2**32 - 1

# What Istio retries when a route says nothing: connection failures, refused streams and 503s.
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "503"})
DEFAULT_RETRY_ATTEMPTS = 2


@dataclass(frozen=True)
class StringMatcher:
    kind: str  # exact | prefix | regex
    value: str
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        value = self.value
        if self.ignore_case and self.kind != "regex":
            text, value = text.lower(), value.lower()
        if self.kind == "exact":
            return text == value
        if self.kind == "prefix":
            return text.startswith(value)
        assert self.pattern is not None
        return self.pattern.fullmatch(text) is not None


def string_matcher(spec: Mapping[str, Any], ignore_case: bool = False) -> StringMatcher:
    for kind in ("exact", "prefix", "regex"):
        if kind in spec and spec[kind] is not None:
            value = str(spec[kind])
            pattern = re.compile(value, re.IGNORECASE if ignore_case else 0) if kind == "regex" else None
            return StringMatcher(kind, value, ignore_case, pattern)
    raise ValueError("a string match needs exact, prefix or regex")


@dataclass(frozen=True)
class HttpMatch:
    """One `match` entry: every condition set here must hold."""

    uri: StringMatcher | None = None
    method: StringMatcher | None = None
    authority: StringMatcher | None = None
    scheme: StringMatcher | None = None
    headers: tuple[tuple[str, StringMatcher], ...] = ()
    without_headers: tuple[tuple[str, StringMatcher], ...] = ()
    query_params: tuple[tuple[str, StringMatcher], ...] = ()
    port: int = 0
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str = ""
    name: str = ""


@dataclass(frozen=True)
class Destination:
    host: str
    subset: str = ""
    port: int = 0


@dataclass(frozen=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True)
class WeightedDestination:
    destination: Destination
    weight: int
    request_ops: HeaderOps = HeaderOps()
    response_ops: HeaderOps = HeaderOps()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON


@dataclass(frozen=True)
class FaultPolicy:
    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    abort_percent: float = 100.0
    abort_grpc_status: int | None = None  # fault.abort.grpcStatus (then abort_status is 200, as from Envoy)


@dataclass(frozen=True)
class MirrorPolicy:
    destination: Destination
    percent: float = 100.0


@dataclass(frozen=True)
class HttpRoute:
    name: str
    matches: tuple[HttpMatch, ...]
    destinations: tuple[WeightedDestination, ...] = ()
    timeout: float | None = None
    retries: RetryPolicy = RetryPolicy()
    fault: FaultPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    request_ops: HeaderOps = HeaderOps()
    response_ops: HeaderOps = HeaderOps()
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    # rewrite.uriRegexRewrite: the path's matches of the pattern replaced (`\\1` names a group)
    rewrite_regex: tuple[re.Pattern[str], str] | None = None
    direct_status: int | None = None
    direct_body: str = ""
    redirect: tuple[int, str, str] | None = None  # (status, uri, authority)
    redirect_scheme: str = ""  # "" keeps the request's
    redirect_port: int = 0  # 0 keeps the request's; the scheme's own port is left out of the Location
    redirect_scheme_port: bool = False  # derivePort FROM_PROTOCOL_DEFAULT: no `port`, the scheme's own


@dataclass(frozen=True)
class VirtualServiceRules:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    routes: tuple[HttpRoute, ...]


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True)
class PoolLimits:
    """connectionPool limits; INFINITE when unset, as Istio configures them."""

    max_connections: int = INFINITE
    max_pending: int = INFINITE
    max_requests: int = INFINITE
    max_retries: int = INFINITE
    connect_timeout: float = 10.0
    max_requests_per_connection: int = 0  # 0: unlimited


@dataclass(frozen=True)
class TrafficPolicy:
    lb: str = "LEAST_REQUEST"
    outlier: OutlierPolicy | None = None
    limits: PoolLimits = PoolLimits()


@dataclass(frozen=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: TrafficPolicy


@dataclass(frozen=True)
class DestinationRuleRules:
    name: str
    namespace: str
    host: str
    policy: TrafficPolicy
    port_policies: tuple[tuple[int, TrafficPolicy], ...] = ()
    subsets: tuple[Subset, ...] = ()

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str, port: int) -> TrafficPolicy:
        found = self.subset(subset) if subset else None
        if found is not None:
            return found.policy
        return dict(self.port_policies).get(port, self.policy)


# ---- compilation -------------------------------------------------------------------------------------

def _seconds(value: Any) -> float | None:
    return None if value in (None, "") else parse_duration(str(value))


def _percent(spec: Mapping[str, Any], legacy: str = "percent") -> float:
    if spec.get("percentage") is not None:
        return float(spec["percentage"].get("value", 0.0))
    if spec.get(legacy) is not None:
        return float(spec[legacy])
    return 100.0


def _pairs(m: Mapping[str, Any] | None, ignore_case: bool = False) -> tuple[tuple[str, StringMatcher], ...]:
    return tuple((k.lower(), string_matcher(v, ignore_case)) for k, v in sorted((m or {}).items()))


def _match(spec: Mapping[str, Any]) -> HttpMatch:
    ic = bool(spec.get("ignoreUriCase"))

    def one(key: str, ignore: bool = False) -> StringMatcher | None:
        return string_matcher(spec[key], ignore) if spec.get(key) else None

    return HttpMatch(uri=one("uri", ic), method=one("method"), authority=one("authority"), scheme=one("scheme"),
                     headers=_pairs(spec.get("headers")), without_headers=_pairs(spec.get("withoutHeaders")),
                     query_params=tuple((k, string_matcher(v)) for k, v in sorted((spec.get("queryParams") or {}).items())),
                     port=int(spec.get("port") or 0),
                     source_labels=tuple(sorted((spec.get("sourceLabels") or {}).items())),
                     source_namespace=spec.get("sourceNamespace") or "", name=spec.get("name") or "")


def _destination(spec: Mapping[str, Any], namespace: str) -> Destination:
    port = (spec.get("port") or {}).get("number") or 0
    return Destination(fqdn(spec["host"], namespace), spec.get("subset") or "", int(port))


def header_ops(spec: Mapping[str, Any] | None) -> HeaderOps:
    spec = spec or {}
    return HeaderOps(set=tuple((k.lower(), str(v)) for k, v in (spec.get("set") or {}).items()),
                     add=tuple((k.lower(), str(v)) for k, v in (spec.get("add") or {}).items()),
                     remove=tuple(str(n).lower() for n in spec.get("remove") or ()))


def _retries(spec: Mapping[str, Any] | None) -> RetryPolicy:
    if spec is None:
        return RetryPolicy()
    on = spec.get("retryOn")
    retry_on = frozenset(p.strip() for p in on.split(",") if p.strip()) if on else DEFAULT_RETRY_ON
    return RetryPolicy(int(spec.get("attempts") or 0), _seconds(spec.get("perTryTimeout")), retry_on)


def _fault(spec: Mapping[str, Any] | None) -> FaultPolicy | None:
    if not spec:
        return None
    delay, abort = spec.get("delay") or {}, spec.get("abort") or {}
    if delay.get("exponentialDelay"):
        raise ValueError("fault.delay.exponentialDelay is not supported: use fixedDelay")
    grpc_status = abort.get("grpcStatus")
    if abort and abort.get("httpStatus") is None and grpc_status not in GRPC_STATUS_CODES:
        raise ValueError("fault.abort needs httpStatus or a grpcStatus name (http2Error is not supported)")
    return FaultPolicy(delay=_seconds(delay.get("fixedDelay")) if delay else None,
                       delay_percent=_percent(delay) if delay else 0.0,
                       abort_status=(int(abort["httpStatus"]) if abort.get("httpStatus") is not None else 200)
                       if abort else None,
                       abort_percent=_percent(abort) if abort else 0.0,
                       abort_grpc_status=GRPC_STATUS_CODES[grpc_status] if abort and grpc_status is not None else None)


def _mirrors(spec: Mapping[str, Any], ns: str) -> tuple[MirrorPolicy, ...]:
    out = []
    if spec.get("mirror"):
        pct = spec.get("mirrorPercentage")
        legacy = spec.get("mirrorPercent", spec.get("mirror_percent"))
        percent = float(pct["value"]) if pct else float(legacy) if legacy is not None else 100.0
        out.append(MirrorPolicy(_destination(spec["mirror"], ns), percent))
    for m in spec.get("mirrors") or ():
        out.append(MirrorPolicy(_destination(m["destination"], ns), _percent(m)))
    return tuple(out)


def _http_route(spec: Mapping[str, Any], ns: str, index: int) -> HttpRoute:
    if spec.get("delegate"):
        raise ValueError("delegate is not supported by waypoints")
    dests = tuple(
        WeightedDestination(_destination(d["destination"], ns),
                            int(d["weight"]) if d.get("weight") is not None else (100 if len(spec["route"]) == 1 else 0),
                            header_ops((d.get("headers") or {}).get("request")),
                            header_ops((d.get("headers") or {}).get("response")))
        for d in spec.get("route") or ())
    headers = spec.get("headers") or {}
    rewrite = spec.get("rewrite") or {}
    regex_rewrite = rewrite.get("uriRegexRewrite")
    redirect = spec.get("redirect")
    direct = spec.get("directResponse")
    body = (direct or {}).get("body") or {}
    return HttpRoute(
        name=spec.get("name") or f"route-{index}",
        matches=tuple(_match(m) for m in spec.get("match") or ()),
        destinations=dests, timeout=_seconds(spec.get("timeout")) or None, retries=_retries(spec.get("retries")),
        fault=_fault(spec.get("fault")), mirrors=_mirrors(spec, ns),
        request_ops=header_ops(headers.get("request")), response_ops=header_ops(headers.get("response")),
        rewrite_uri=rewrite.get("uri"), rewrite_authority=rewrite.get("authority"),
        rewrite_regex=(re.compile(regex_rewrite["match"]), str(regex_rewrite["rewrite"])) if regex_rewrite else None,
        direct_status=int(direct["status"]) if direct else None,
        direct_body=str(body.get("string", "")) if isinstance(body, dict) else "",
        redirect=(int(redirect.get("redirectCode") or 301), redirect.get("uri") or "", redirect.get("authority") or "")
        if redirect else None,
        redirect_scheme=str((redirect or {}).get("scheme") or ""), redirect_port=int((redirect or {}).get("port") or 0),
        redirect_scheme_port=(redirect or {}).get("derivePort") == "FROM_PROTOCOL_DEFAULT",
    )


def compile_virtual_service(where: str, name: str, namespace: str, spec: Mapping[str, Any]) -> VirtualServiceRules:
    routes = []
    for i, route in enumerate(spec.get("http") or ()):
        try:
            routes.append(_http_route(route, namespace, i))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(where, f"spec.http[{i}]: {exc}") from exc
    hosts = tuple(fqdn(h, namespace) for h in spec.get("hosts") or ())
    return VirtualServiceRules(name, namespace, hosts, tuple(routes))


def _outlier(spec: Mapping[str, Any] | None) -> OutlierPolicy | None:
    if spec is None:
        return None
    c5 = spec.get("consecutive5xxErrors", spec.get("consecutiveErrors"))
    return OutlierPolicy(consecutive_5xx=int(c5) if c5 is not None else 5,
                         consecutive_gateway=int(spec.get("consecutiveGatewayErrors") or 0),
                         interval=_seconds(spec.get("interval")) or 10.0,
                         base_ejection_time=_seconds(spec.get("baseEjectionTime")) or 30.0,
                         max_ejection_percent=int(spec.get("maxEjectionPercent", 10)))


def _limits(spec: Mapping[str, Any] | None) -> PoolLimits:
    tcp, http = (spec or {}).get("tcp") or {}, (spec or {}).get("http") or {}

    def lim(d: Mapping[str, Any], key: str) -> int:
        return int(d[key]) if d.get(key) else INFINITE

    return PoolLimits(max_connections=lim(tcp, "maxConnections"), max_pending=lim(http, "http1MaxPendingRequests"),
                      max_requests=lim(http, "http2MaxRequests"), max_retries=lim(http, "maxRetries"),
                      connect_timeout=_seconds(tcp.get("connectTimeout")) or 10.0,
                      max_requests_per_connection=int(http.get("maxRequestsPerConnection") or 0))


def _policy(spec: Mapping[str, Any] | None, base: TrafficPolicy | None = None) -> TrafficPolicy:
    """A traffic policy; fields `spec` leaves out come from `base` (subset-level over top-level)."""
    base = base or TrafficPolicy()
    spec = spec or {}
    lb = (spec.get("loadBalancer") or {}).get("simple")
    if (spec.get("loadBalancer") or {}).get("consistentHash"):
        raise ValueError("loadBalancer.consistentHash is not supported: use ROUND_ROBIN, LEAST_REQUEST or RANDOM")
    if lb in ("LEAST_CONN",):
        lb = "LEAST_REQUEST"
    if lb in (None, "UNSPECIFIED"):
        lb = base.lb
    if lb == "PASSTHROUGH":
        raise ValueError("loadBalancer PASSTHROUGH is not supported by waypoints")
    return TrafficPolicy(lb=lb,
                         outlier=_outlier(spec["outlierDetection"]) if spec.get("outlierDetection") else base.outlier,
                         limits=_limits(spec["connectionPool"]) if spec.get("connectionPool") else base.limits)


def compile_destination_rule(where: str, name: str, namespace: str, spec: Mapping[str, Any]) -> DestinationRuleRules:
    try:
        top = _policy(spec.get("trafficPolicy"))
        ports = tuple((int(p["port"]["number"]), _policy(p, top))
                      for p in (spec.get("trafficPolicy") or {}).get("portLevelSettings") or ())
        subsets = tuple(Subset(s["name"], tuple(sorted((s.get("labels") or {}).items())), _policy(s.get("trafficPolicy"), top))
                        for s in spec.get("subsets") or ())
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(where, f"spec.trafficPolicy: {exc}") from exc
    return DestinationRuleRules(name, namespace, fqdn(spec["host"], namespace), top, ports, subsets)
