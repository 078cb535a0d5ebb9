"""Routing: from a request head to a `RouteDecision` (pure; randomness comes from an injected RNG).

The decision says everything the proxy will do for the request, before any byte goes upstream: which
service and route, which cluster (host, subset, port, traffic policy) and its candidate endpoints, the
request head as it will be sent (header operations and rewrites applied), timeout, retry policy, fault
(delay and/or abort), mirrors, response header operations, or a local reply instead of forwarding.

Istio's rules: the target service is the one the client addressed (the tunnel's original destination:
service VIP:port), else the one the Host header names; routes are tried in order and the first whose
`match` list has an entry that holds wins (no `match`: always); without a VirtualService the request goes
to the service itself; a route's destinations are chosen by weight.

An ingress gateway's table (`RouteTable.ingress`) routes by what the client asked for instead: of the
VirtualServices bound to the gateway, the one whose host covers the Host header most narrowly (an exact
name over a wildcard, a longer wildcard over a shorter) among those with a route for the listener's port;
no such host is 404 (`NR`).  The service of the decision is the one the chosen route sends to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl

from mesh.bounded import BoundedMemo
from waypoint.config import RouteTable, ServiceInfo
from waypoint.l7.model import (
    ClientInfo,
    Endpoint,
    Headers,
    RequestHead,
    split_host_port,
    with_header,
    without,
)
from waypoint.l7.rules import (
    Destination,
    HeaderOps,
    HttpMatch,
    HttpRoute,
    RetryPolicy,
    TrafficPolicy,
    VirtualServiceRules,
    WeightedDestination,
)


@dataclass(frozen=True)
class Cluster:
    """Where a request goes: a service port, optionally narrowed to a subset, with its traffic policy."""

    hostname: str
    port: int
    subset: str = ""
    policy: TrafficPolicy = TrafficPolicy()
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.hostname}|{self.subset}|{self.port}"


@dataclass(frozen=True)
class LocalReply:
    status: int
    body: bytes = b""
    flag: str = "-"
    headers: Headers = ()
    grpc_status: int | None = None  # to a gRPC request: this grpc-status, not the one mapped from `status`


@dataclass(frozen=True)
class FaultDecision:
    delay: float | None = None
    abort_status: int | None = None
    abort_grpc_status: int | None = None  # the grpc-status of the abort's answer to a gRPC request


@dataclass(frozen=True)
class MirrorDecision:
    cluster: Cluster
    request: RequestHead


@dataclass(frozen=True)
class RouteDecision:
    service: ServiceInfo | None
    route_name: str = ""
    cluster: Cluster | None = None
    request: RequestHead | None = None
    timeout: float | None = None
    retries: RetryPolicy = RetryPolicy()
    fault: FaultDecision = FaultDecision()
    mirrors: tuple[MirrorDecision, ...] = ()
    response_ops: tuple[HeaderOps, ...] = ()
    local_reply: LocalReply | None = None
    table_version: int = 0
    notes: tuple[str, ...] = field(default=())


_DEFAULT_PORTS = {"http": 80, "https": 443}

# What `resolve_cluster` gave for (destination, incoming port) against one route table: the caller keeps one
# per table and drops it with the table, so that no request resolves a destination again.
ClusterCache = BoundedMemo[tuple[Destination, int], "Cluster | LocalReply"]
CLUSTER_CACHE_SIZE = 1024


# ---- matching --------------------------------------------------------------------------------------

def _query(head: RequestHead) -> dict[str, str]:
    return dict(parse_qsl(head.query, keep_blank_values=True))


def match_holds(m: HttpMatch, head: RequestHead, port: int, source: Endpoint | None, source_ns: str) -> bool:
    if m.uri is not None and not m.uri.matches(head.uri_path):
        return False
    if m.method is not None and not m.method.matches(head.method):
        return False
    if m.authority is not None and not m.authority.matches(head.authority):
        return False
    if m.scheme is not None and not m.scheme.matches(head.scheme):
        return False
    if m.port and m.port != port:
        return False
    for name, sm in m.headers:
        if not sm.matches(head.header(name)):
            return False
    for name, sm in m.without_headers:
        if sm.matches(head.header(name)):
            return False
    if m.query_params:
        q = _query(head)
        if not all(sm.matches(q.get(name)) for name, sm in m.query_params):
            return False
    if m.source_labels and (source is None or not source.has_labels(m.source_labels)):
        return False
    return not (m.source_namespace and m.source_namespace != source_ns)


def select_route(routes: tuple[HttpRoute, ...], head: RequestHead, port: int, source: Endpoint | None,
                 source_ns: str) -> tuple[HttpRoute, HttpMatch | None] | None:
    for route in routes:
        if not route.matches:
            return route, None
        for m in route.matches:
            if match_holds(m, head, port, source, source_ns):
                return route, m
    return None


def choose_weighted(dests: tuple[WeightedDestination, ...], rng: random.Random) -> WeightedDestination | None:
    total = sum(d.weight for d in dests)
    if total <= 0:
        return None
    draw = rng.randrange(total)
    for d in dests:
        if draw < d.weight:
            return d
        draw -= d.weight
    return dests[-1]


def roll(percent: float, rng: random.Random) -> bool:
    """True on `percent`% of draws (0 never, 100 always)."""
    if percent >= 100.0:
        return True
    return percent > 0.0 and rng.random() * 100.0 < percent


# ---- header operations -------------------------------------------------------------------------------

def apply_ops(headers: Headers, ops: HeaderOps) -> Headers:
    out = without(headers, ops.remove)
    for name, value in ops.set:
        out = with_header(out, name, value)
    for name, value in ops.add:
        out = (*out, (name, value))
    return out


def shadow_authority(authority: str) -> str:
    host, port = split_host_port(authority)
    return f"{host}-shadow:{port}" if port else f"{authority}-shadow"


# ---- the decision ----------------------------------------------------------------------------------

def _target(table: RouteTable, head: RequestHead, client: ClientInfo) -> tuple[ServiceInfo | None, int, Endpoint | None]:
    ip, port = client.destination_ip, client.destination_port
    hostname = table.by_vip.get(ip)
    if hostname is not None:
        return table.services[hostname], port, None
    if ip in table.workloads_by_ip and port:
        return None, port, table.workloads_by_ip[ip]
    host, hport = split_host_port(head.authority)
    svc = table.service_for_host(host, table.waypoint.split("/")[0])
    if svc is None:
        return None, 0, None
    return svc, hport or port or svc.default_port(), None


def _host_rank(pattern: str) -> tuple[int, int]:
    """How narrowly a VirtualService host matches (larger: narrower)."""
    if pattern == "*":
        return (0, 0)
    return (0, len(pattern)) if pattern.startswith("*.") else (1, len(pattern))


def _covers(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def ingress_virtual_service(table: RouteTable, head: RequestHead, port: int) -> VirtualServiceRules | None:
    """The VirtualService an ingress gateway routes `head` (arriving on listener `port`) with, or None."""
    host = split_host_port(head.authority)[0].lower().rstrip(".")
    best: tuple[tuple[int, int], VirtualServiceRules] | None = None
    for vs in table.ingress_routes:
        if not any(not r.matches or any(not m.port or m.port == port for m in r.matches) for r in vs.routes):
            continue  # nothing for this listener
        for pattern in vs.hosts:
            if _covers(pattern, host) and (best is None or _host_rank(pattern) > best[0]):
                best = (_host_rank(pattern), vs)
    return best[1] if best else None


def target_hostname(table: RouteTable, head: RequestHead, client: ClientInfo) -> str:
    """The hostname of the service `head` is for ("" for a workload, or when none is known): what picks
    the JWT rules and policies before the route is decided."""
    if table.ingress:
        return ""
    svc, _, _ = _target(table, head, client)
    return svc.hostname if svc is not None else ""


def _resolve(table: RouteTable, dest: Destination, incoming_port: int, cache: ClusterCache | None) -> Cluster | LocalReply:
    if cache is None:
        return resolve_cluster(table, dest, incoming_port)
    key = (dest, incoming_port)
    found = cache.get(key)
    if found is None:  # (the port can come from a Host header: the memo is bounded)
        found = cache.keep(key, resolve_cluster(table, dest, incoming_port))
    return found


def resolve_cluster(table: RouteTable, dest: Destination, incoming_port: int) -> Cluster | LocalReply:
    svc = table.services.get(dest.host) or table.service_for_host(dest.host)
    if svc is None:
        return LocalReply(503, f"no service {dest.host} is known to this waypoint".encode(), "NC")
    port = dest.port or (incoming_port if svc.port_info(incoming_port) else svc.default_port())
    endpoints = svc.endpoints.get(port, ())
    dr = table.destination_rule(svc.hostname)
    policy = dr.policy_for(dest.subset, port) if dr else TrafficPolicy()
    if dest.subset:
        subset = dr.subset(dest.subset) if dr else None
        if subset is None:
            return LocalReply(503, f"subset {dest.subset!r} of {svc.hostname} is not defined by a DestinationRule".encode(), "NC")
        endpoints = tuple(e for e in endpoints if e.has_labels(subset.labels))
    return Cluster(svc.hostname, port, dest.subset, policy, endpoints)


def _rewrite(head: RequestHead, route: HttpRoute, m: HttpMatch | None) -> RequestHead:
    if route.rewrite_uri is not None:
        path, query = head.uri_path, head.query
        if m is not None and m.uri is not None and m.uri.kind == "prefix":
            path = route.rewrite_uri + path[len(m.uri.value):]
        else:
            path = route.rewrite_uri
        head = head.replace(path=path + (f"?{query}" if query else ""))
    if route.rewrite_regex is not None:
        pattern, replacement = route.rewrite_regex
        path = pattern.sub(replacement, head.uri_path) or "/"  # a path is never empty
        head = head.replace(path=path + (f"?{head.query}" if head.query else ""))
    if route.rewrite_authority:
        head = head.replace(authority=route.rewrite_authority)
    return head


def _decide_ingress(table: RouteTable, head: RequestHead, client: ClientInfo, rng: random.Random,
                    cache: ClusterCache | None) -> RouteDecision:
    port = client.destination_port
    vs = ingress_virtual_service(table, head, port)
    if vs is None:
        return RouteDecision(None, local_reply=LocalReply(404, b"", "NR"), table_version=table.version)
    d = _decide_routes(table, None, vs, head, port, client, rng, cache)
    return replace(d, service=table.services.get(d.cluster.hostname)) if d.cluster is not None else d


def decide(table: RouteTable, head: RequestHead, client: ClientInfo, rng: random.Random,
           cache: ClusterCache | None = None) -> RouteDecision:
    """The decision for `head`; `cache`, kept by the caller for `table` alone, saves resolving each
    destination again."""
    if table.ingress:
        return _decide_ingress(table, head, client, rng, cache)
    svc, port, workload = _target(table, head, client)
    v = table.version
    if workload is not None:
        cluster = Cluster(workload.address, port, endpoints=(replace(workload, port=port),))
        return RouteDecision(None, "workload", cluster, head, table_version=v)
    if svc is None:
        return RouteDecision(None, local_reply=LocalReply(404, b"", "NR"), table_version=v)
    vs = table.virtual_service(svc.hostname)
    if vs is None:
        res = _resolve(table, Destination(svc.hostname, "", port), port, cache)
        if isinstance(res, LocalReply):
            return RouteDecision(svc, "default", local_reply=res, table_version=v)
        return RouteDecision(svc, "default", res, head, table_version=v)
    return _decide_routes(table, svc, vs, head, port, client, rng, cache)


def _decide_routes(table: RouteTable, svc: ServiceInfo | None, vs: VirtualServiceRules, head: RequestHead, port: int,
                   client: ClientInfo, rng: random.Random, cache: ClusterCache | None = None) -> RouteDecision:
    """The decision of `vs`'s first route that holds for `head` (404 when none does)."""
    v = table.version
    source = table.workloads_by_ip.get(client.source_ip)
    found = select_route(vs.routes, head, port, source, client.namespace)
    if found is None:
        return RouteDecision(svc, local_reply=LocalReply(404, b"", "NR"), table_version=v)
    route, m = found
    fault = FaultDecision()
    if route.fault is not None:
        f = route.fault
        delay = f.delay if f.delay is not None and roll(f.delay_percent, rng) else None
        aborted = f.abort_status is not None and roll(f.abort_percent, rng)
        fault = FaultDecision(delay=delay, abort_status=f.abort_status if aborted else None,
                              abort_grpc_status=f.abort_grpc_status if aborted else None)
    if route.direct_status is not None:
        return RouteDecision(svc, route.name, fault=fault, response_ops=(route.response_ops,), table_version=v,
                             local_reply=LocalReply(route.direct_status, route.direct_body.encode(), "DR"))
    if route.redirect is not None:
        code, uri, authority = route.redirect
        scheme, authority = route.redirect_scheme or head.scheme, authority or head.authority
        port = route.redirect_port or (_DEFAULT_PORTS.get(scheme, 0) if route.redirect_scheme_port else 0)
        if port:
            host = split_host_port(authority)[0]
            host = f"[{host}]" if ":" in host else host
            authority = host if _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
        location = f"{scheme}://{authority}{uri or head.path}"
        return RouteDecision(svc, route.name, fault=fault, table_version=v,
                             local_reply=LocalReply(code, b"", "-", (("location", location),)))
    chosen = choose_weighted(route.destinations, rng)
    if chosen is None:
        return RouteDecision(svc, route.name, local_reply=LocalReply(503, b"no destination has weight", "NC"),
                             table_version=v)
    res = _resolve(table, chosen.destination, port, cache)
    if isinstance(res, LocalReply):
        return RouteDecision(svc, route.name, local_reply=res, table_version=v)
    out = _rewrite(head, route, m)
    out = out.replace(headers=apply_ops(apply_ops(out.headers, chosen.request_ops), route.request_ops))
    mirrors = []
    for mp in route.mirrors:
        if roll(mp.percent, rng):
            mc = _resolve(table, mp.destination, port, cache)
            if isinstance(mc, Cluster):
                mirrors.append(MirrorDecision(mc, out.replace(authority=shadow_authority(out.authority))))
    return RouteDecision(svc, route.name, res, out, timeout=route.timeout, retries=route.retries, fault=fault,
                         mirrors=tuple(mirrors), response_ops=(chosen.response_ops, route.response_ops),
                         table_version=v)
