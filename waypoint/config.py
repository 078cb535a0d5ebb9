"""The waypoint's configuration: discovery resources compiled into one frozen `RouteTable`.

`compile_table(waypoint, workloads, services, l7_configs)` reads what xDS delivered (the `Workload`,
`Service` and `L7Config` messages of `mesh.proto.discovery_pb2`), keeps the L7 configs that name this
waypoint, checks each spec again with `mesh.api` (the model that validated it in the control plane:
defensive, a newer or older control plane may disagree) and compiles it.  A resource that cannot be
compiled is reported in `CompileResult.errors` (and by resource name in `failed`) and left out, the rest
compiled as if it were not there (the xDS handler applies the rest); warnings report
what is accepted but not enforced as written (CUSTOM authorization, duplicate VirtualServices).

Namespaces keep to themselves, as in Istio:
- a policy (AuthorizationPolicy, RequestAuthentication) applies through its `targetRefs`, and only those
  in its own namespace count unless it is in the root namespace (`istio-system`); a policy whose targets
  are all elsewhere is left out, before it is compiled, so another namespace cannot widen, narrow or
  break this waypoint's configuration;
- a VirtualService is seen only where its `exportTo` reaches (the waypoint's namespace); of those that
  cover a service, the one in the service's own namespace wins, then one naming the host exactly over a
  wildcard, then by name and namespace (Istio orders by creation time first; the store keeps none); a
  DestinationRule likewise, preferring the waypoint's namespace, then the service's, then the root's;
- a tunnel is admitted only for a service bound to this waypoint (`Service.waypoint`), or a workload
  that sends its own traffic through it;
- a `jwksUri` over plain http is an error unless the waypoint is started with `--allow-http-jwks`;
- tracing follows the Telemetry resources the control plane sent this waypoint, resolved for its
  namespace and Gateway (`mesh.tracing.sampler.resolve`: root, then namespace, then targetRefs).

The table is immutable: a configuration change builds a new table and the proxy swaps the reference, so
requests in flight keep the decision they made on the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from mesh import defaults
from mesh.api.crossref import fqdn, host_covers
from mesh.api.errors import FieldError
from mesh.api.kinds import kind_info
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.api.schema import drop_nulls
from mesh.istiometrics import canonical_app, canonical_version
from mesh.proto import discovery_pb2 as pb
from mesh.tracing.sampler import TelemetryDoc, TracingPolicy, levels, resolve
from mesh.xds.resources import L7_KIND_NAMES, name_of
from waypoint.errors import ConfigError
from waypoint.l7.authz import CompiledPolicy, compile_policy
from waypoint.l7.jwt import JwtRule, compile_rules
from waypoint.l7.l4authz import L4Policy, to_l4
from waypoint.l7.model import Endpoint
from waypoint.l7.rules import (
    DestinationRuleRules,
    VirtualServiceRules,
    compile_destination_rule,
    compile_virtual_service,
)


@dataclass(frozen=True)
class ServicePortInfo:
    port: int
    target_port: int
    name: str = ""
    app_protocol: str = ""


@dataclass(frozen=True)
class ServiceInfo:
    hostname: str
    name: str
    namespace: str
    vips: tuple[str, ...] = ()
    ports: tuple[ServicePortInfo, ...] = ()
    # Endpoints by service port (the workload's target port filled in).
    endpoints: Mapping[int, tuple[Endpoint, ...]] = field(default_factory=dict)
    waypoint: str = ""  # "ns/name" of the waypoint its traffic goes through, "" for none

    def port_info(self, port: int) -> ServicePortInfo | None:
        return next((p for p in self.ports if p.port == port), None)

    def default_port(self) -> int:
        return self.ports[0].port if self.ports else 0


@dataclass(frozen=True)
class AccessLogging:
    """Whether the waypoint writes a line per request (`Telemetry.accessLogging`; on when none says)."""

    enabled: bool = True
    sources: tuple[str, ...] = ()  # the Telemetry that decided it, "ns/name", for config dumps


def access_logging(telemetries: Iterable[TelemetryDoc], *, namespace: str, gateway: str) -> AccessLogging:
    """The most specific level's `accessLogging` (root namespace, then the waypoint's namespace, then one
    naming its Gateway): `disabled: true` turns the log off, an entry without it (or `false`) on again."""
    out = AccessLogging()
    for level in levels(telemetries, namespace=namespace, gateway=gateway):
        doc = next((d for d in level if d.spec.get("accessLogging")), None)
        if doc is not None:
            out = AccessLogging(not doc.spec["accessLogging"][0].get("disabled", False), (doc.ref,))
    return out


@dataclass(frozen=True)
class RouteTable:
    waypoint: str = ""
    services: Mapping[str, ServiceInfo] = field(default_factory=dict)
    by_vip: Mapping[str, str] = field(default_factory=dict)  # VIP -> hostname
    workloads_by_ip: Mapping[str, Endpoint] = field(default_factory=dict)  # port 0
    # Addresses of the workloads whose own traffic uses this waypoint (workload-addressed tunnels).
    waypoint_workloads: frozenset[str] = frozenset()
    virtual_services: Mapping[str, VirtualServiceRules] = field(default_factory=dict)  # hostname -> VS
    destination_rules: Mapping[str, DestinationRuleRules] = field(default_factory=dict)
    policies: tuple[CompiledPolicy, ...] = ()
    l4_policies: tuple[L4Policy, ...] = ()  # the same policies, as checked on non-HTTP tunnels
    jwt_rules: tuple[JwtRule, ...] = ()
    tracing: TracingPolicy = TracingPolicy()  # from the Telemetry resources that apply to this waypoint
    access_log: AccessLogging = AccessLogging()  # likewise
    version: int = 0
    # Gateway mode (an ingress Gateway's pods): requests are routed by Host header and listener port through
    # the VirtualServices bound to this gateway (`gateways`), most specific host first.
    ingress: bool = False
    ingress_routes: tuple[VirtualServiceRules, ...] = ()

    def refusal(self, host: str, port: int) -> str:
        """Why a tunnel to host:port is refused, "" when it is admitted: the VIP and a port of a service
        bound to this waypoint (to any waypoint when the table is for ""), or a workload that sends its
        own traffic through it."""
        hostname = self.by_vip.get(host)
        waypoint = self.waypoint or "this waypoint"
        if hostname is not None:
            svc = self.services[hostname]
            if not svc.waypoint or (self.waypoint and svc.waypoint != self.waypoint):
                return f"service {hostname} does not use waypoint {waypoint}"
            if svc.port_info(port) is None:
                return f"service {hostname} has no port {port}"
            return ""
        if host in self.waypoint_workloads:
            return ""
        return f"neither a service of this mesh (VIP:port) nor a workload that uses waypoint {waypoint}"

    def jwks_sources(self) -> dict[str, float]:
        """The key sets to fetch: `jwksUri` -> fetch timeout (the longest any rule asks for)."""
        out: dict[str, float] = {}
        for r in self.jwt_rules:
            if r.jwks is None and r.jwks_uri:
                out[r.jwks_uri] = max(out.get(r.jwks_uri, 0.0), r.timeout)
        return out

    def service_for_host(self, host: str, namespace: str = "") -> ServiceInfo | None:
        """A service by Host header value: full name, `name.ns`, or short name in `namespace`."""
        host = host.lower()
        if host in self.services:
            return self.services[host]
        for candidate in (f"{host}.svc.cluster.local", f"{host}.{namespace}.svc.cluster.local"):
            if candidate in self.services:
                return self.services[candidate]
        return None

    def destination_rule(self, hostname: str) -> DestinationRuleRules | None:
        if hostname in self.destination_rules:
            return self.destination_rules[hostname]
        for pattern, dr in self.destination_rules.items():
            if host_covers(pattern, hostname):
                return dr
        return None

    def virtual_service(self, hostname: str) -> VirtualServiceRules | None:
        return self.virtual_services.get(hostname)

    def waypoint_pods(self, waypoint: str) -> tuple[Endpoint, ...]:
        """The healthy pods of waypoint "ns/name", by address."""
        ns, _, name = waypoint.partition("/")
        return tuple(sorted((w for w in self.workloads_by_ip.values()
                             if w.namespace == ns and dict(w.labels).get(GATEWAY_NAME_LABEL) == name and w.healthy),
                            key=lambda w: w.address))


def pool_changes(old: RouteTable, new: RouteTable) -> Callable[[str, str], bool]:
    """For `ConnectionPool.retire`: whether the upstream connections to an endpoint ("ip:port") opened for a
    service (its hostname, "" for a workload's own address) were decided differently under `new` than under
    `old`, so that none of them may carry a request any more.  What a connection rests on: the endpoint's
    workload (its identity, which its HBONE server must present, and whether it is reached over HBONE at
    all), the service (addresses, ports, waypoint), the DestinationRule that applies to it, and for an
    ingress gateway the waypoint pod its requests go through.  Envoy likewise drains the pools of a cluster
    that changed and of a host that left, and keeps the others."""
    hops: dict[tuple[int, str], str] = {}  # (which table, waypoint) -> its first pod (`waypoint.gateway.waypoint_hop`)

    def basis(table: RouteTable, endpoint: str, service: str) -> tuple[object, ...]:
        w = table.workloads_by_ip.get(endpoint.rpartition(":")[0])
        svc = table.services.get(service) if service else None
        hop = ""
        if table.ingress and svc is not None and svc.waypoint:
            if (id(table), svc.waypoint) not in hops:
                pods = table.waypoint_pods(svc.waypoint)
                hops[id(table), svc.waypoint] = f"{pods[0].address} {pods[0].identity}" if pods else ""
            hop = hops[id(table), svc.waypoint]
        return ((w.uid, w.namespace, w.identity, w.hbone, w.cluster) if w is not None else None,
                (svc.vips, svc.ports, svc.waypoint) if svc is not None else None,
                table.destination_rule(service) if service else None, hop)

    def changed(endpoint: str, service: str) -> bool:
        return basis(old, endpoint, service) != basis(new, endpoint, service)

    return changed


@dataclass(frozen=True)
class CompileResult:
    table: RouteTable
    errors: tuple[ConfigError, ...] = ()
    warnings: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)  # L7Config resource name -> why it was left out


def struct_to_dict(msg: Any) -> dict[str, Any]:
    """A Struct as plain data; whole-number floats (Struct has no integers) become ints again, and a null
    field is not set (`mesh.api.schema.drop_nulls`, as the control plane stores it)."""
    out: dict[str, Any] = drop_nulls(_ints(json_format.MessageToDict(msg)))
    return out


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _endpoint(w: pb.Workload, address: str, port: int) -> Endpoint:
    td = w.trust_domain or defaults.TRUST_DOMAIN
    labels = tuple(sorted(w.labels.items()))
    return Endpoint(address=address, port=port, uid=w.uid, name=w.name, namespace=w.namespace,
                    identity=f"spiffe://{td}/ns/{w.namespace}/sa/{w.service_account}" if w.service_account else "",
                    labels=labels, app=w.canonical_name or w.labels.get("app", ""),
                    version=w.canonical_revision or w.labels.get("version", ""),
                    healthy=w.status == pb.HEALTHY, hbone=w.tunnel_protocol == pb.HBONE,
                    canonical_service=canonical_app(w), canonical_revision=canonical_version(w),
                    cluster=w.cluster_id)


def _waypoint_of(s: pb.Service) -> str:
    return f"{s.waypoint.namespace}/{s.waypoint.name}" if s.HasField("waypoint") and s.waypoint.name else ""


def _services(workloads: Iterable[pb.Workload], services: Iterable[pb.Service]) -> dict[str, ServiceInfo]:
    out: dict[str, ServiceInfo] = {}
    workloads = list(workloads)
    for s in services:
        key = f"{s.namespace}/{s.hostname}"
        ports = tuple(ServicePortInfo(p.service_port, p.target_port or p.service_port, p.name, p.app_protocol)
                      for p in s.ports)
        eps: dict[int, list[Endpoint]] = {p.port: [] for p in ports}
        for w in sorted(workloads, key=lambda w: w.uid):
            if key not in w.services or not w.addresses or w.is_waypoint:
                continue
            mapping = {m.service_port: m.target_port for m in w.services[key].ports}
            for p in ports:
                target = mapping.get(p.port) or p.target_port
                eps[p.port].append(_endpoint(w, w.addresses[0], target))
        out[s.hostname] = ServiceInfo(s.hostname, s.name, s.namespace, tuple(s.vips), ports,
                                      {k: tuple(v) for k, v in eps.items()}, _waypoint_of(s))
    return out


def _uses(w: pb.Workload, waypoint: str) -> bool:
    """Does workload `w` send its own traffic through `waypoint` ("ns/name"; "" means any waypoint)?"""
    if not w.HasField("waypoint") or w.is_waypoint:
        return False
    return not waypoint or f"{w.waypoint.namespace}/{w.waypoint.name}" == waypoint


def _validate(kind: str, spec: dict[str, Any], where: str) -> None:
    info = kind_info(kind)
    if info is None or info.spec is None:
        raise ConfigError(where, f"kind {kind} is not known to this waypoint")
    errors: list[FieldError] = []
    info.spec.check(spec, "spec", errors)
    if errors:
        raise ConfigError(where, "; ".join(f"{e.path}: {e.message}" for e in errors))


def _policy_hosts(msg: pb.L7Config, spec: Mapping[str, Any], waypoint: str, where: str,
                  warnings: list[str]) -> tuple[str, ...] | None:
    """The hostnames a waypoint policy covers here (`()`: every request through the waypoint), or None
    when none of its `targetRefs` reaches this waypoint from where the policy may reach.

    As in Istio, a reference into another namespace counts only for a policy of the root namespace.  A
    policy without `targetRefs` keeps the hostnames the control plane addressed it with."""
    listed, single = spec.get("targetRefs") or [], spec.get("targetRef")
    refs = [r for r in [*(listed if isinstance(listed, list) else []), *([single] if single else [])]
            if isinstance(r, Mapping)]
    if not refs:
        return tuple(msg.hostnames)
    ns = msg.namespace
    usable = []
    for ref in refs:
        ref_ns = ref.get("namespace") or ns
        if ref_ns != ns and ns != defaults.ROOT_NAMESPACE:
            warnings.append(f"{where}: targetRef {ref.get('kind')} {ref_ns}/{ref.get('name')} is in another "
                            f"namespace and is ignored (only policies in {defaults.ROOT_NAMESPACE} may target "
                            "other namespaces)")
            continue
        usable.append((ref.get("kind"), ref_ns, ref.get("name", "")))
    if any(kind == "Gateway" and (not waypoint or f"{ref_ns}/{name}" == waypoint) for kind, ref_ns, name in usable):
        return ()
    hosts = tuple(dict.fromkeys(fqdn(name, ref_ns) for kind, ref_ns, name in usable if kind == "Service"))
    return hosts or None


def _exported_to(spec: Mapping[str, Any], own: str, namespace: str) -> bool:
    """Is a resource of namespace `own` with this `exportTo` visible in `namespace` ("" sees all)?"""
    export = spec.get("exportTo") or ["*"]
    return not namespace or "*" in export or namespace in export or ("." in export and own == namespace)


def _host_namespace(hostname: str, svcs: Mapping[str, ServiceInfo]) -> str:
    svc = svcs.get(hostname)
    if svc is not None:
        return svc.namespace
    parts = hostname.split(".")
    return parts[1] if len(parts) > 2 and parts[2] == "svc" else ""


def _virtual_services(vss: list[VirtualServiceRules], svcs: Mapping[str, ServiceInfo],
                      warnings: list[str]) -> dict[str, VirtualServiceRules]:
    """Each service's VirtualService: its own namespace's first, then an exact host over a wildcard,
    then by name and namespace."""
    out: dict[str, VirtualServiceRules] = {}
    for hostname, svc in svcs.items():
        covering = [vs for vs in vss if any(host_covers(h, hostname) for h in vs.hosts)]
        if not covering:
            continue
        covering.sort(key=lambda vs: (vs.namespace != svc.namespace, hostname not in vs.hosts, vs.name, vs.namespace))
        chosen = covering[0]
        if len(covering) > 1:
            warnings.append(f"service {hostname}: several VirtualServices apply; using "
                            f"{chosen.namespace}/{chosen.name}")
        out[hostname] = chosen
    return out


def _destination_rules(drs: list[DestinationRuleRules], svcs: Mapping[str, ServiceInfo],
                       namespace: str) -> dict[str, DestinationRuleRules]:
    """One DestinationRule per host: the waypoint's namespace's, then the host's, then the root's."""
    def rank(dr: DestinationRuleRules) -> tuple[int, str, str]:
        order = [namespace, _host_namespace(dr.host, svcs), defaults.ROOT_NAMESPACE]
        return (order.index(dr.namespace) if dr.namespace in order else len(order), dr.name, dr.namespace)

    out: dict[str, DestinationRuleRules] = {}
    for dr in sorted(drs, key=rank):
        out.setdefault(dr.host, dr)
    return out


def compile_table(waypoint: str, workloads: Iterable[pb.Workload], services: Iterable[pb.Service],
                  l7_configs: Iterable[pb.L7Config], version: int = 0, *,
                  allow_http_jwks: bool = False, ingress: bool = False) -> CompileResult:
    """Compile what this waypoint (`ns/name`; "" takes every L7 config) needs into a RouteTable.
    `allow_http_jwks` lets a `jwksUri` be plain http (refused otherwise: anyone on the path could hand in
    keys).  `ingress`: the table of an ingress gateway, whose VirtualServices are those naming it in
    `gateways`, routed by host (`RouteTable.ingress_routes`) rather than by service."""
    workloads = list(workloads)
    svcs = _services(workloads, services)
    own_namespace = waypoint.split("/")[0] if waypoint else ""
    errors: list[ConfigError] = []
    failed: dict[str, str] = {}
    warnings: list[str] = []
    vss: list[VirtualServiceRules] = []
    ingress_vss: list[VirtualServiceRules] = []
    drs: list[DestinationRuleRules] = []
    policies: list[CompiledPolicy] = []
    l4_policies: list[L4Policy] = []
    jwt_rules: list[JwtRule] = []
    telemetries: list[TelemetryDoc] = []
    for msg in sorted(l7_configs, key=lambda m: (m.kind, m.namespace, m.name)):
        if waypoint and waypoint not in msg.waypoints:
            continue
        kind = L7_KIND_NAMES.get(msg.kind, "")
        where = f"{kind or 'L7Config'} {msg.namespace}/{msg.name}"
        try:
            spec = struct_to_dict(msg.spec)
            if kind in ("VirtualService", "DestinationRule") and not _exported_to(spec, msg.namespace, own_namespace):
                continue  # not exported to this waypoint's namespace
            hostnames: tuple[str, ...] = ()
            if kind in ("AuthorizationPolicy", "RequestAuthentication"):
                reached = _policy_hosts(msg, spec, waypoint, where, warnings)
                if reached is None:
                    warnings.append(f"{where}: none of its targets is reachable from its namespace here: not applied")
                    continue
                hostnames = reached
            _validate(kind, spec, where)
            if kind == "VirtualService" and ingress:
                if waypoint in (spec.get("gateways") or ()):
                    ingress_vss.append(compile_virtual_service(where, msg.name, msg.namespace, spec))
            elif kind == "VirtualService":
                vss.append(compile_virtual_service(where, msg.name, msg.namespace, spec))
            elif kind == "DestinationRule":
                drs.append(compile_destination_rule(where, msg.name, msg.namespace, spec))
            elif kind == "AuthorizationPolicy":
                policy, warns = compile_policy(where, msg.name, msg.namespace, spec, list(hostnames))
                try:
                    l4_policies.append(to_l4(policy))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(where, f"cannot be checked at L4: {exc}") from exc
                policies.append(policy)
                warnings.extend(warns)
            elif kind == "RequestAuthentication":
                rules = compile_rules(where, msg.namespace, msg.name, spec, list(hostnames))
                for r in rules:
                    if r.jwks is None and r.jwks_uri.lower().startswith("http:") and not allow_http_jwks:
                        raise ConfigError(where, f"jwksUri {r.jwks_uri!r} is plain http, so anyone on the path "
                                                 "could hand in keys: serve the key set over https (or start "
                                                 "the waypoint with --allow-http-jwks)")
                jwt_rules.extend(rules)
            elif kind == "Telemetry":
                telemetries.append(TelemetryDoc(msg.namespace, msg.name, spec))
        except Exception as exc:  # noqa: BLE001 - one resource that does not compile is left out alone
            error = exc if isinstance(exc, ConfigError) else ConfigError(where, f"cannot be compiled: {exc!r}")
            errors.append(error)
            failed[name_of(msg)] = str(error)
    table = RouteTable(
        waypoint=waypoint, services=svcs,
        by_vip={vip: s.hostname for s in svcs.values() for vip in s.vips},
        workloads_by_ip={w.addresses[0]: _endpoint(w, w.addresses[0], 0) for w in workloads if w.addresses},
        waypoint_workloads=frozenset(a for w in workloads if _uses(w, waypoint) for a in w.addresses),
        virtual_services=_virtual_services(vss, svcs, warnings),
        destination_rules=_destination_rules(drs, svcs, own_namespace),
        policies=tuple(policies), l4_policies=tuple(l4_policies), jwt_rules=tuple(jwt_rules),
        tracing=resolve(telemetries, namespace=own_namespace, gateway=waypoint.partition("/")[2]),
        access_log=access_logging(telemetries, namespace=own_namespace, gateway=waypoint.partition("/")[2]),
        version=version,
        ingress=ingress, ingress_routes=tuple(sorted(ingress_vss, key=lambda vs: (vs.namespace, vs.name))))
    return CompileResult(table, tuple(errors), tuple(warnings), failed)
