"""Gateway API routes (HTTPRoute, GRPCRoute) for waypoints: route status, and the routes as waypoints run them.

Parents.  A route takes effect through each `parentRefs` entry that resolves:
- a Service (`group: ""`, `kind: Service`) of the route's namespace that is bound to a waypoint: the route
  is that service's, at every port or only at `port`/`sectionName` (a port's name);
- a waypoint Gateway (`gatewayClassName: istio-waypoint`) of the route's namespace (listener `mesh`): the
  route is every service's that the waypoint serves whose hostname one of the route's `hostnames` covers
  (all of them when it has none).
- an ingress Gateway (`gatewayClassName: istio`): the listeners that take the route
  (`controlplane.translate.ingress.attach`: sectionName/port, allowedRoutes, hostnames), for the hostnames
  the route and each listener have in common.
A Service or waypoint in another namespace (a consumer route, a cross-namespace listener) and any other
parent kind is not accepted.

Status (`route_statuses`): per parent, `Accepted` (reasons `Accepted`, `NoMatchingParent`,
`NotAllowedByListeners`, `NoMatchingListenerHostname`, `UnsupportedValue`) and `ResolvedRefs` (`ResolvedRefs`,
`BackendNotFound`, `InvalidKind`, `RefNotPermitted`) as the Gateway API defines them, with
`controllerName: istio.io/mesh-controller` and the route's generation.  Pure, like the rest of
translation: no transition times (the control plane has no clock here).

Routing (`gateway_routes`).  Every match of every rule of every accepted route of one service becomes one
entry of one VirtualService-shaped spec for that service (`L7Config` `VirtualService/<ns>/gateway-api~<svc>`),
which waypoints compile with the route model they already have (`waypoint.l7.rules`).  Entries are ordered as
the Gateway API orders matches across routes: Exact path, then RegularExpression, then PathPrefix (longest
first), then a method match, then more header matches, then more query parameter matches, then the oldest
route (`metadata.creationTimestamp`), then by `namespace/name`, then rule and match order.  GRPCRoute
matches become the path matches they mean (`/pkg.Service/Method`) and are ordered as such.  The rest:
- PathPrefix is segment-wise (`/api` holds for `/api` and `/api/x`, not `/apix`): a regular expression;
- backend weights become percentages (largest remainder: exact for weights summing to 100, within 1 point
  otherwise); a backend that does not resolve (see ResolvedRefs) is left out and its share goes to the
  others; a rule with no backend left, or with no weight, answers 500;
- filters: header modifiers (on the rule or a backend) -> `headers`, `URLRewrite` -> `rewrite` (a
  `ReplacePrefixMatch` is a `uriRegexRewrite` of the matched prefix), `RequestRedirect` -> `redirect`,
  `RequestMirror` -> `mirrors`; `timeouts.request` -> `timeout`, `timeouts.backendRequest` -> the per-try
  timeout of Istio's default retries.
The routes of an ingress Gateway become one VirtualService-shaped spec per (Gateway, hostname)
(`VirtualService/<gateway ns>/gateway-api~<gateway>~<hostname>`, `gateways: [<ns>/<gateway>]`, each
match narrowed to its listener's `port`), sent to that Gateway's pods only (`L7Config.waypoints`), which
route by Host header and path (`waypoint.l7.routing`, gateway mode).
VirtualServices beside routes: as in Istio, on a waypoint the routes win.  A VirtualService host naming a
service that has routes is taken out of that VirtualService (reported as a problem); a VirtualService left
with no host goes to no waypoint.  A wildcard host is kept: the routes' exact host wins at the waypoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from controlplane.translate import ingress
from controlplane.translate.guard import guarded
from controlplane.translate.l7 import created
from controlplane.translate.workloads import DEFAULT_TRUST_DOMAIN, build_index, build_services
from mesh.api.crossref import fqdn, host_covers
from mesh.api.kinds_gateway import WAYPOINT_LISTENER, WAYPOINT_PORT, is_ingress
from mesh.api.kinds_routes import ROUTE_KINDS
from mesh.api.schema import parse_duration
from mesh.api.validate import Ref
from mesh.proto import discovery_pb2 as pb

GATEWAY_GROUP = "gateway.networking.k8s.io"
CONTROLLER = "istio.io/mesh-controller"
NAME_PREFIX = "gateway-api~"  # `~` is in no Kubernetes name, so no VirtualService of a user's is called this
VS_API_VERSION = "networking.istio.io/v1"
ISTIO_RETRY_ATTEMPTS = 2  # what Istio retries when a route names a per-try timeout and no attempts


@dataclass(frozen=True)
class Condition:
    type: str
    ok: bool
    reason: str
    message: str

    def to_json(self, generation: int) -> dict[str, Any]:
        return {"type": self.type, "status": "True" if self.ok else "False", "reason": self.reason,
                "message": self.message, "observedGeneration": generation}


@dataclass(frozen=True)
class Parent:
    """One `parentRefs` entry, resolved: whether it is accepted, and the services (hostnames) it attaches to."""

    ref: Mapping[str, Any]
    accepted: Condition
    hostnames: tuple[str, ...] = ()
    port: int = 0
    attachments: tuple[ingress.Attachment, ...] = ()  # an ingress Gateway's listeners that took the route


@dataclass(frozen=True)
class Backend:
    """One backendRef, resolved: `host` "" when it does not resolve (`problem` says why)."""

    host: str
    port: int
    weight: int
    reason: str = ""
    problem: str = ""


@dataclass
class RouteView:
    body: Mapping[str, Any]
    parents: list[Parent] = field(default_factory=list)
    resolved: Condition = Condition("ResolvedRefs", True, "ResolvedRefs", "all references resolved")

    @property
    def where(self) -> str:
        meta = self.body["metadata"]
        return f"{self.body['kind']} {meta['namespace']}/{meta['name']}"


# ---- resolving parents and backends ---------------------------------------------------------------------

def _service(services: Mapping[str, pb.Service], namespace: str, name: str) -> pb.Service | None:
    return services.get(f"{namespace}/{fqdn(name, namespace)}")


def _waypoint_of(svc: pb.Service) -> str:
    return f"{svc.waypoint.namespace}/{svc.waypoint.name}" if svc.HasField("waypoint") and svc.waypoint.name else ""


def _refused(ref: Mapping[str, Any], reason: str, message: str) -> Parent:
    return Parent(ref, Condition("Accepted", False, reason, message))


def _service_parent(ref: Mapping[str, Any], ns: str, route_ns: str, services: Mapping[str, pb.Service]) -> Parent:
    name = ref["name"]
    if ns != route_ns:
        return _refused(ref, "UnsupportedValue", f"Service {ns}/{name} is in another namespace: routes for "
                        "another namespace's service (consumer routes) are not supported by waypoints")
    svc = _service(services, ns, name)
    if svc is None:
        return _refused(ref, "NoMatchingParent", f"Service {ns}/{name} does not exist")
    if not _waypoint_of(svc):
        return _refused(ref, "NoMatchingParent", f"Service {ns}/{name} has no waypoint: label it (or its namespace) "
                        "istio.io/use-waypoint=<waypoint>")
    port = int(ref.get("port") or 0)
    section = ref.get("sectionName")
    if section:
        named = next((p.service_port for p in svc.ports if p.name == section), 0)
        if not named or (port and named != port):
            return _refused(ref, "NoMatchingParent", f"Service {ns}/{name} has no port named {section!r}"
                            + (f" at {port}" if port and named else ""))
        port = named
    if port and not any(p.service_port == port for p in svc.ports):
        return _refused(ref, "NoMatchingParent", f"Service {ns}/{name} has no port {port}")
    return Parent(ref, Condition("Accepted", True, "Accepted", f"attached to Service {ns}/{name} through "
                                 f"waypoint {_waypoint_of(svc)}"), (svc.hostname,), port)


def _ingress_parent(ref: Mapping[str, Any], body: Mapping[str, Any], route_kind: str, route_ns: str,
                    route_hosts: list[str], snapshot: Any) -> Parent:
    found = ingress.attach(ingress.ingress_gateway(body), ref, route_kind, route_ns, route_hosts, snapshot)
    return Parent(ref, Condition("Accepted", found.ok, found.reason, found.message), attachments=found.attachments)


def _gateway_parent(ref: Mapping[str, Any], ns: str, route_kind: str, route_ns: str, route_hosts: list[str],
                    snapshot: Any, services: Mapping[str, pb.Service], waypoints: set[tuple[str, str]]) -> Parent:
    name = ref["name"]
    if (ns, name) not in waypoints:
        body = snapshot.get("Gateway", ns, name)
        if body is not None and is_ingress(body):
            return _ingress_parent(ref, body, route_kind, route_ns, route_hosts, snapshot)
        if body is not None:
            return _refused(ref, "NoMatchingParent", f"Gateway {ns}/{name} is of class "
                            f"{(body.get('spec') or {}).get('gatewayClassName')!r}, which this mesh does not serve "
                            "(istio: ingress, istio-waypoint: waypoint)")
        return _refused(ref, "NoMatchingParent", f"Gateway {ns}/{name} does not exist")
    if ns != route_ns:
        return _refused(ref, "NotAllowedByListeners", f"waypoint {ns}/{name} takes routes of its own namespace only")
    if ref.get("sectionName") not in (None, WAYPOINT_LISTENER) or ref.get("port") not in (None, WAYPOINT_PORT):
        return _refused(ref, "NoMatchingParent", f"waypoint {ns}/{name} has one listener, {WAYPOINT_LISTENER!r} "
                        f"on port {WAYPOINT_PORT}")
    served = sorted(s.hostname for s in services.values() if _waypoint_of(s) == f"{ns}/{name}")
    hosts = [h for h in served if not route_hosts or any(host_covers(p, h) for p in route_hosts)]
    if not hosts:
        what = "no service" if not served else f"none of its services matches the route's hostnames {route_hosts}"
        return _refused(ref, "NoMatchingListenerHostname", f"waypoint {ns}/{name} serves {what}")
    return Parent(ref, Condition("Accepted", True, "Accepted", f"attached to waypoint {ns}/{name} for "
                                 f"{len(hosts)} service{'s' * (len(hosts) != 1)}"), tuple(hosts))


def _parent(ref: Mapping[str, Any], route_kind: str, route_ns: str, route_hosts: list[str], snapshot: Any,
            services: Mapping[str, pb.Service], waypoints: set[tuple[str, str]]) -> Parent:
    group, kind = ref.get("group", GATEWAY_GROUP), ref.get("kind", "Gateway")
    ns = ref.get("namespace") or route_ns
    if group in ("", "core") and kind == "Service":
        return _service_parent(ref, ns, route_ns, services)
    if group == GATEWAY_GROUP and kind == "Gateway":
        return _gateway_parent(ref, ns, route_kind, route_ns, route_hosts, snapshot, services, waypoints)
    return _refused(ref, "UnsupportedValue", f"a parent of kind {kind} (group {group or 'core'!r}) is not "
                    "supported: use a Service, a waypoint Gateway or an ingress Gateway")


def _backend(ref: Mapping[str, Any], route_ns: str, services: Mapping[str, pb.Service]) -> Backend:
    group, kind, name = ref.get("group", ""), ref.get("kind", "Service"), ref["name"]
    ns, port, weight = ref.get("namespace") or route_ns, int(ref.get("port") or 0), int(ref.get("weight", 1))
    if group not in ("", "core") or kind != "Service":
        return Backend("", port, weight, "InvalidKind", f"backend {kind} {name}: only Services can be backends")
    if ns != route_ns:
        return Backend("", port, weight, "RefNotPermitted", f"backend Service {ns}/{name} is in another "
                       "namespace (ReferenceGrant is not supported)")
    svc = _service(services, ns, name)
    if svc is None:
        return Backend("", port, weight, "BackendNotFound", f"backend Service {ns}/{name} does not exist")
    if not any(p.service_port == port for p in svc.ports):
        return Backend("", port, weight, "BackendNotFound", f"backend Service {ns}/{name} has no port {port}")
    return Backend(svc.hostname, port, weight)


def _backend_refs(rule: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every backend a rule names: its backendRefs, then its mirrors'."""
    mirrors = [f["requestMirror"]["backendRef"] for f in rule.get("filters") or [] if f["type"] == "RequestMirror"]
    return [*(rule.get("backendRefs") or []), *mirrors]


def _resolved(body: Mapping[str, Any], services: Mapping[str, pb.Service]) -> Condition:
    ns = body["metadata"]["namespace"]
    failed = [b for rule in body["spec"].get("rules") or [] for ref in _backend_refs(rule)
              if (b := _backend(ref, ns, services)).reason]
    if not failed:
        return Condition("ResolvedRefs", True, "ResolvedRefs", "all references resolved")
    order = ("InvalidKind", "RefNotPermitted", "BackendNotFound")
    reason = min((b.reason for b in failed), key=order.index)
    return Condition("ResolvedRefs", False, reason, "; ".join(dict.fromkeys(b.problem for b in failed)))


def _view(body: Mapping[str, Any], snapshot: Any, services: Mapping[str, pb.Service],
          waypoints: set[tuple[str, str]]) -> RouteView:
    spec, ns = body.get("spec") or {}, body["metadata"]["namespace"]
    hosts = list(spec.get("hostnames") or [])
    return RouteView(body, [_parent(ref, body["kind"], ns, hosts, snapshot, services, waypoints)
                            for ref in spec.get("parentRefs") or []],
                     _resolved(body, services))


def analyse(snapshot: Any, services: Mapping[str, pb.Service], waypoints: set[tuple[str, str]],
            errors: list[str] | None = None) -> list[RouteView]:
    """Every route with its parents resolved and its references checked (one that cannot be is left out,
    and said so in `errors`)."""
    errors = errors if errors is not None else []
    views = (guarded(body, errors, _view, body, snapshot, services, waypoints)
             for kind in ROUTE_KINDS for body in snapshot.of_kind(kind))
    return [v for v in views if v is not None]


def status_of(view: RouteView) -> dict[str, Any]:
    generation = int(view.body["metadata"].get("generation") or 0)
    return {"parents": [{"parentRef": dict(p.ref), "controllerName": CONTROLLER,
                         "conditions": [p.accepted.to_json(generation), view.resolved.to_json(generation)]}
                        for p in view.parents]}


def route_statuses(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> dict[Ref, dict[str, Any]]:
    """The status of every HTTPRoute and GRPCRoute of `snapshot`, by resource."""
    index = build_index(snapshot, trust_domain)
    views = analyse(snapshot, build_services(index), set(index.waypoints))
    return {Ref.of(dict(v.body)): status_of(v) for v in views}


# ---- matches, in the Gateway API's order ---------------------------------------------------------------

def _prefix_regex(prefix: str) -> str:
    """A PathPrefix as a regular expression over the whole path: segment by segment."""
    return re.escape(prefix.rstrip("/")) + "(/.*)?"


def _http_match(m: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The VirtualService match of one HTTPRouteMatch, and its rank (smaller first)."""
    out: dict[str, Any] = {}
    path = m.get("path") or {}
    kind, value = path.get("type", "PathPrefix"), path.get("value", "/")
    if kind == "Exact":
        out["uri"], rank = {"exact": value}, (0, -len(value))
    elif kind == "RegularExpression":
        out["uri"], rank = {"regex": value}, (1, -len(value))
    else:
        if value.rstrip("/"):
            out["uri"] = {"regex": _prefix_regex(value)}
        rank = (2, -len(value.rstrip("/")))
    if m.get("method"):
        out["method"] = {"exact": m["method"]}
    headers = {h["name"].lower(): _string_match(h) for h in m.get("headers") or []}
    params = {q["name"]: _string_match(q) for q in m.get("queryParams") or []}
    if headers:
        out["headers"] = headers
    if params:
        out["queryParams"] = params
    return out, (*rank, 0 if m.get("method") else 1, -len(headers), -len(params))


def _string_match(m: Mapping[str, Any]) -> dict[str, str]:
    return {"regex" if m.get("type") == "RegularExpression" else "exact": str(m["value"])}


_ANY_NAME = "[^/]+"


def _grpc_match(m: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The VirtualService match of one GRPCRouteMatch (`/service/method` paths), and its rank."""
    out: dict[str, Any] = {}
    method = m.get("method") or {}
    service, name = method.get("service"), method.get("method")
    if method.get("type", "Exact") == "Exact" and service and name:
        path = f"/{service}/{name}"
        out["uri"], rank = {"exact": path}, (0, -len(path))
    elif method.get("type", "Exact") == "Exact" and (service or name):
        regex = f"/{re.escape(service) if service else _ANY_NAME}/{re.escape(name) if name else _ANY_NAME}"
        out["uri"], rank = {"regex": regex}, (1, -len(service or "") - len(name or ""))
    elif service or name:
        regex = f"/{service or _ANY_NAME}/{name or _ANY_NAME}"
        out["uri"], rank = {"regex": regex}, (1, -len(service or "") - len(name or ""))
    else:
        rank = (2, 0)
    headers = {h["name"].lower(): _string_match(h) for h in m.get("headers") or []}
    if headers:
        out["headers"] = headers
    return out, (*rank, 1, -len(headers), 0)


# ---- rules ----------------------------------------------------------------------------------------------

def percentages(weights: list[int]) -> list[int]:
    """Weights as whole percentages summing to 100 (largest remainder; ties to the earlier one)."""
    total = sum(weights)
    exact = [w * 100 / total for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: 100 - sum(out)]:
        out[i] += 1
    return out


def _header_ops(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = spec or {}
    out: dict[str, Any] = {}
    if spec.get("set"):
        out["set"] = {h["name"].lower(): h["value"] for h in spec["set"]}
    if spec.get("add"):
        out["add"] = {h["name"].lower(): h["value"] for h in spec["add"]}
    if spec.get("remove"):
        out["remove"] = [n.lower() for n in spec["remove"]]
    return out


def _headers(filters: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in filters:
        if f["type"] == "RequestHeaderModifier" and (ops := _header_ops(f["requestHeaderModifier"])):
            out["request"] = ops
        elif f["type"] == "ResponseHeaderModifier" and (ops := _header_ops(f["responseHeaderModifier"])):
            out["response"] = ops
    return out


def _destination(backend: Backend) -> dict[str, Any]:
    return {"host": backend.host, "port": {"number": backend.port}}


def _mirror_percent(spec: Mapping[str, Any]) -> float:
    if spec.get("percent") is not None:
        return float(spec["percent"])
    fraction = spec.get("fraction")
    if fraction is not None:
        return 100.0 * fraction["numerator"] / fraction.get("denominator", 100)
    return 100.0


def _rule_action(rule: Mapping[str, Any], ns: str, services: Mapping[str, pb.Service]) -> dict[str, Any]:
    """What one rule does (everything of a VirtualService http entry but its match)."""
    filters = list(rule.get("filters") or [])
    out: dict[str, Any] = {}
    headers = _headers(filters)
    if headers:
        out["headers"] = headers
    for f in filters:
        if f["type"] == "RequestRedirect":
            r = f["requestRedirect"]
            redirect: dict[str, Any] = {"redirectCode": int(r.get("statusCode", 302))}
            if r.get("hostname"):
                redirect["authority"] = r["hostname"]
            if (r.get("path") or {}).get("replaceFullPath"):
                redirect["uri"] = r["path"]["replaceFullPath"]
            if r.get("scheme"):
                redirect["scheme"] = r["scheme"]
            if r.get("port"):
                redirect["port"] = int(r["port"])
            elif r.get("scheme"):  # the Gateway API: the scheme's own port
                redirect["derivePort"] = "FROM_PROTOCOL_DEFAULT"
            out["redirect"] = redirect
            return out
    for f in filters:
        if f["type"] == "URLRewrite":
            rewrite: dict[str, Any] = {}
            r = f["urlRewrite"]
            if r.get("hostname"):
                rewrite["authority"] = r["hostname"]
            path = r.get("path") or {}
            if path.get("type") == "ReplaceFullPath":
                rewrite["uri"] = path["replaceFullPath"]
            if rewrite:
                out["rewrite"] = rewrite
    mirrors = []
    for f in filters:
        if f["type"] == "RequestMirror":
            b = _backend(f["requestMirror"]["backendRef"], ns, services)
            if b.host:
                mirrors.append({"destination": _destination(b),
                                "percentage": {"value": _mirror_percent(f["requestMirror"])}})
    if mirrors:
        out["mirrors"] = mirrors
    timeouts = rule.get("timeouts") or {}
    if timeouts.get("request") and parse_duration(timeouts["request"]) > 0:
        out["timeout"] = timeouts["request"]
    if timeouts.get("backendRequest") and parse_duration(timeouts["backendRequest"]) > 0:
        out["retries"] = {"attempts": ISTIO_RETRY_ATTEMPTS, "perTryTimeout": timeouts["backendRequest"]}
    backends = [(b, ref) for ref in rule.get("backendRefs") or []
                if (b := _backend(ref, ns, services)).host and b.weight > 0]
    if not backends:
        return {"directResponse": {"status": 500}, **({"headers": headers} if headers else {})}
    shares = percentages([b.weight for b, _ in backends])
    route = []
    for (b, ref), share in zip(backends, shares, strict=True):
        if share == 0 and len(backends) > 1:
            continue
        dest: dict[str, Any] = {"destination": _destination(b), "weight": share if len(backends) > 1 else 100}
        own = _headers(list(ref.get("filters") or []))
        if own:
            dest["headers"] = own
        route.append(dest)
    out["route"] = route
    return out


def _prefix_rewrite(rule: Mapping[str, Any], match: Mapping[str, Any]) -> dict[str, str] | None:
    """A URLRewrite ReplacePrefixMatch for `match`: a regex rewrite of the matched prefix, or None."""
    for f in rule.get("filters") or []:
        path = (f.get("urlRewrite") or {}).get("path") or {} if f["type"] == "URLRewrite" else {}
        if path.get("type") == "ReplacePrefixMatch":
            prefix = ((match.get("path") or {}).get("value") or "/").rstrip("/")
            replacement = path["replacePrefixMatch"].rstrip("/").replace("\\", "\\\\")
            return {"match": f"^{re.escape(prefix)}(/.*)?$", "rewrite": replacement + "\\1"}
    return None


@dataclass(frozen=True)
class Entry:
    rank: tuple[Any, ...]
    http: dict[str, Any]


def _entries(view: RouteView, parent: Parent, services: Mapping[str, pb.Service]) -> list[Entry]:
    body = view.body
    meta, spec = body["metadata"], body["spec"]
    grpc = body["kind"] == "GRPCRoute"
    out = []
    for i, rule in enumerate(spec.get("rules") or [{}]):
        action = _rule_action(rule, meta["namespace"], services)
        for j, m in enumerate(rule.get("matches") or [{}]):
            match, rank = _grpc_match(m) if grpc else _http_match(m)
            if parent.port:
                match["port"] = parent.port
            http = {"name": f"{meta['namespace']}.{meta['name']}.{i}.{j}", **action}
            if match:
                http["match"] = [match]
            if "route" in action and (regex := _prefix_rewrite(rule, m)) is not None:
                http["rewrite"] = {**http.get("rewrite", {}), "uriRegexRewrite": regex}
            out.append(Entry((*rank, created(body), meta["namespace"], meta["name"], i, j), http))
    return out


# ---- the waypoints' configuration -----------------------------------------------------------------------

def _config(svc: pb.Service, entries: list[Entry]) -> pb.L7Config:
    spec = struct_pb2.Struct()
    json_format.ParseDict({"hosts": [svc.hostname], "http": [e.http for e in sorted(entries, key=lambda e: e.rank)]},
                          spec)
    return pb.L7Config(kind=pb.VIRTUAL_SERVICE, name=NAME_PREFIX + svc.name, namespace=svc.namespace,
                       api_version=VS_API_VERSION, waypoints=[_waypoint_of(svc)], hostnames=[svc.hostname], spec=spec)


def _without_hosts(msg: pb.L7Config, governed: Mapping[str, str], problems: list[str]) -> pb.L7Config:
    """A user's VirtualService without the hosts that routes govern (None of it reaches a waypoint if no
    host is left)."""
    spec = json_format.MessageToDict(msg.spec)
    kept: list[str] = []
    dropped: list[str] = []
    for h in spec.get("hosts") or []:
        (dropped if fqdn(h, msg.namespace) in governed else kept).append(h)
    if not dropped:
        return msg
    for h in dropped:
        problems.append(f"VirtualService {msg.namespace}/{msg.name}: host {h} is routed by {governed[fqdn(h, msg.namespace)]}: "
                        "the routes take effect on the waypoint and the VirtualService is ignored for it")
    out = pb.L7Config()
    out.CopyFrom(msg)
    spec["hosts"] = kept
    out.spec.Clear()
    json_format.ParseDict(spec, out.spec)
    del out.hostnames[:]
    out.hostnames.extend(fqdn(h, msg.namespace) for h in kept)
    if not kept:
        del out.waypoints[:]
    return out


def _attach(view: RouteView, services: Mapping[str, pb.Service]) -> list[tuple[str, list[Entry]]]:
    """(service hostname, entries) for each service an accepted parent attaches `view` to."""
    return [(host, _entries(view, parent, services)) for parent in view.parents if parent.accepted.ok
            for host in parent.hostnames]


def _attach_ingress(view: RouteView, services: Mapping[str, pb.Service]) -> list[tuple[tuple[str, str], list[Entry]]]:
    """((gateway, hostname), entries) for each listener and hostname of an ingress Gateway that took `view`:
    its matches narrowed to the listener's port."""
    return [((a.gateway, host), _entries(view, Parent(parent.ref, parent.accepted, port=a.port), services))
            for parent in view.parents if parent.accepted.ok for a in parent.attachments for host in a.hostnames]


def _ingress_config(gateway: str, host: str, entries: list[Entry]) -> pb.L7Config:
    namespace, name = gateway.split("/", 1)
    spec = struct_pb2.Struct()
    json_format.ParseDict({"hosts": [host], "gateways": [gateway],
                           "http": [e.http for e in sorted(entries, key=lambda e: e.rank)]}, spec)
    return pb.L7Config(kind=pb.VIRTUAL_SERVICE, name=f"{NAME_PREFIX}{name}~{host}", namespace=namespace,
                       api_version=VS_API_VERSION, waypoints=[gateway], hostnames=[host], spec=spec)


def gateway_routes(snapshot: Any, services: Mapping[str, pb.Service], waypoints: set[tuple[str, str]],
                   l7: Mapping[str, pb.L7Config], problems: list[str],
                   errors: list[str] | None = None) -> dict[str, pb.L7Config]:
    """`l7` with the routes' configurations added (one per service that has routes) and the hosts they
    govern taken out of VirtualServices.  A route that cannot be translated is left out and reported in
    `errors` (`controlplane.translate.guard`)."""
    errors = errors if errors is not None else problems
    by_host: dict[str, list[Entry]] = {}
    by_ingress: dict[tuple[str, str], list[Entry]] = {}
    governed: dict[str, list[str]] = {}
    for view in analyse(snapshot, services, waypoints, errors):
        for parent in view.parents:
            if not parent.accepted.ok:
                problems.append(f"{view.where}: parent {parent.ref.get('kind', 'Gateway')} {parent.ref['name']} "
                                f"not accepted ({parent.accepted.reason}): {parent.accepted.message}")
        for host, entries in guarded(view.body, errors, _attach, view, services) or []:
            by_host.setdefault(host, []).extend(entries)
            governed.setdefault(host, []).append(view.where)
        for key, entries in guarded(view.body, errors, _attach_ingress, view, services) or []:
            by_ingress.setdefault(key, []).extend(entries)
        if not view.resolved.ok:
            problems.append(f"{view.where}: {view.resolved.reason}: {view.resolved.message}")
    svc_by_host = {s.hostname: s for s in services.values()}
    names = {h: ", ".join(dict.fromkeys(w)) for h, w in governed.items()}
    out = {key: _without_hosts(msg, names, problems) if msg.kind == pb.VIRTUAL_SERVICE else msg
           for key, msg in l7.items()}
    for host, entries in sorted(by_host.items()):
        msg = _config(svc_by_host[host], entries)
        out[f"VirtualService/{msg.namespace}/{msg.name}"] = msg
    for (gateway, host), entries in sorted(by_ingress.items()):
        msg = _ingress_config(gateway, host, entries)
        out[f"VirtualService/{msg.namespace}/{msg.name}"] = msg
    return out
