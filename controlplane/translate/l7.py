"""Translation of L7 configuration into `L7Config` messages for waypoints.

Each VirtualService, DestinationRule, waypoint-targeted AuthorizationPolicy and RequestAuthentication
becomes one `L7Config` carrying its validated spec as written (a waypoint reads it with `mesh.api`), the
fully qualified hostnames it concerns, and the waypoints (`<ns>/<gateway>`) that must apply it:
- VirtualService and DestinationRule: the waypoints of the services their hosts cover (short hosts are
  qualified in the resource's namespace).  Two VirtualServices naming the same host: the oldest keeps it
  (`metadata.creationTimestamp`, then name, then namespace, as Istio orders configuration); the newer one
  loses that host (it leaves its `hosts` and `hostnames`, and is reported), and with no host left it goes
  to no waypoint;
- AuthorizationPolicy and RequestAuthentication with `targetRef(s)`: a `Gateway` target names the
  waypoint itself; a `Service` target means that service's waypoint.  A target in another namespace is
  ignored (and reported) unless the policy is in the root namespace, as in Istio.  Policies with a selector or no
  target are not for waypoints (AuthorizationPolicies go to agents at L4; a RequestAuthentication
  without a target is reported as not enforced, as in Istio ambient mode);
- Telemetry (tracing, access logging): one in the root namespace without selector or targets goes to every waypoint, a
  namespace's own to the waypoints of that namespace, one with `targetRefs` to the waypoint Gateways it
  names (same namespace rule as policies); one with a `selector` selects sidecars, which this mesh has
  none of: it goes to no waypoint and is reported.
A config whose services have no waypoint is still sent (with no waypoints), so `proxy-status` and
waypoints added later see it; waypoints filter on the `waypoints` field.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from controlplane.translate.guard import guarded
from mesh.api.crossref import fqdn, host_covers
from mesh.defaults import ROOT_NAMESPACE
from mesh.proto import discovery_pb2 as pb

_KINDS = {
    "VirtualService": pb.VIRTUAL_SERVICE,
    "DestinationRule": pb.DESTINATION_RULE,
    "AuthorizationPolicy": pb.AUTHORIZATION_POLICY,
    "RequestAuthentication": pb.REQUEST_AUTHENTICATION,
    "Telemetry": pb.TELEMETRY,
}


def _waypoint_name(addr: pb.GatewayAddress) -> str:
    return f"{addr.namespace}/{addr.name}"


def _envelope(body: Mapping[str, Any], waypoints: set[str], hostnames: list[str]) -> pb.L7Config:
    meta = body["metadata"]
    spec = struct_pb2.Struct()
    json_format.ParseDict(body.get("spec") or {}, spec)
    return pb.L7Config(kind=_KINDS[body["kind"]], name=meta["name"], namespace=meta["namespace"],
                       api_version=body["apiVersion"], waypoints=sorted(waypoints),
                       hostnames=list(dict.fromkeys(hostnames)), spec=spec, labels=meta.get("labels") or {},
                       revision=str(meta.get("generation", "")))


def created(body: Mapping[str, Any]) -> datetime.datetime:
    """When the store created `body` (`metadata.creationTimestamp`); an object without one (or with one
    that is not RFC 3339) counts as the newest."""
    value = (body.get("metadata") or {}).get("creationTimestamp")
    try:
        when = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return datetime.datetime.max.replace(tzinfo=datetime.UTC)
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _claim(body: Mapping[str, Any]) -> tuple[datetime.datetime, str, str, list[str]]:
    """(creation time, name, namespace, qualified hosts) of a VirtualService: Istio orders configuration
    by creation time, then name, then namespace."""
    meta = body["metadata"]
    ns, name = str(meta["namespace"]), str(meta["name"])
    return created(body), name, ns, list(dict.fromkeys(fqdn(h, ns) for h in body["spec"]["hosts"]))


def lost_hosts(virtual_services: Iterable[Mapping[str, Any]], problems: list[str]) -> dict[tuple[str, str], set[str]]:
    """(namespace, name) of each VirtualService -> the qualified hosts an older one already has.  A body
    that cannot be read is skipped here (its own translation step reports it)."""
    claims = [c for c in (guarded(b, [], _claim, b) for b in virtual_services) if c is not None]
    owner: dict[str, str] = {}
    lost: dict[tuple[str, str], set[str]] = {}
    for _, name, ns, hosts in sorted(claims, key=lambda c: c[:3]):
        for host in hosts:
            if host in owner:
                lost.setdefault((ns, name), set()).add(host)
                problems.append(f"VirtualService {ns}/{name}: host {host} is already routed by the older "
                                f"VirtualService {owner[host]}: ignored for that host (the oldest wins)")
            else:
                owner[host] = f"{ns}/{name}"
    return lost


def _by_hosts(hosts: list[str], services: Mapping[str, pb.Service]) -> set[str]:
    return {_waypoint_name(s.waypoint) for s in services.values()
            if s.HasField("waypoint") and any(host_covers(h, s.hostname) for h in hosts)}


def _targets(body: Mapping[str, Any], services: Mapping[str, pb.Service], waypoints: set[tuple[str, str]],
             problems: list[str]) -> tuple[set[str], list[str]]:
    meta, spec = body["metadata"], body.get("spec") or {}
    refs = list(spec.get("targetRefs") or []) + ([spec["targetRef"]] if spec.get("targetRef") else [])
    where = f"{body['kind']} {meta['namespace']}/{meta['name']}"
    found: set[str] = set()
    hostnames: list[str] = []
    for ref in refs:
        ns = ref.get("namespace") or meta["namespace"]
        if ns != meta["namespace"] and meta["namespace"] != ROOT_NAMESPACE:
            problems.append(f"{where}: targets {ref['kind']} {ns}/{ref['name']} in another namespace: ignored "
                            f"(only policies in {ROOT_NAMESPACE} may target other namespaces)")
            continue
        if ref["kind"] == "Gateway":
            if (ns, ref["name"]) in waypoints:
                found.add(f"{ns}/{ref['name']}")
            else:
                problems.append(f"{where}: targets Gateway {ns}/{ref['name']}, which is not a waypoint")
        elif ref["kind"] == "Service":
            host = fqdn(ref["name"], ns)
            svc = services.get(f"{ns}/{host}")
            hostnames.append(host)
            if svc is not None and svc.HasField("waypoint"):
                found.add(_waypoint_name(svc.waypoint))
            else:
                problems.append(f"{where}: targets Service {ns}/{ref['name']}, which has no waypoint: not enforced")
        else:
            problems.append(f"{where}: target kind {ref['kind']} is not supported")
    return found, hostnames


def build_l7(snapshot: Any, services: Mapping[str, pb.Service], waypoints: set[tuple[str, str]],
             problems: list[str], errors: list[str] | None = None) -> dict[str, pb.L7Config]:
    """One L7Config per VirtualService, DestinationRule and waypoint policy; one that cannot be translated
    is left out and reported in `errors` (`controlplane.translate.guard`)."""
    errors = errors if errors is not None else problems
    out: dict[str, pb.L7Config] = {}
    lost = lost_hosts(snapshot.of_kind("VirtualService"), problems)

    def virtual_service(body: Mapping[str, Any]) -> pb.L7Config:
        meta = body["metadata"]
        ns = meta["namespace"]
        gone = lost.get((ns, meta["name"]), set())
        kept = [h for h in body["spec"]["hosts"] if fqdn(h, ns) not in gone]
        if not kept:  # every host is an older VirtualService's: sent as it is, to no waypoint
            return _envelope(body, set(), [])
        if gone:
            body = {**body, "spec": {**body["spec"], "hosts": kept}}
        hosts = [fqdn(h, ns) for h in kept]
        return _envelope(body, _by_hosts(hosts, services), hosts)

    def destination_rule(body: Mapping[str, Any]) -> pb.L7Config:
        host = fqdn(body["spec"]["host"], body["metadata"]["namespace"])
        return _envelope(body, _by_hosts([host], services), [host])

    def policy(body: Mapping[str, Any]) -> pb.L7Config | None:
        spec = body.get("spec") or {}
        if not (spec.get("targetRef") or spec.get("targetRefs")):
            if body["kind"] == "RequestAuthentication":
                meta = body["metadata"]
                problems.append(f"RequestAuthentication {meta['namespace']}/{meta['name']}: without targetRefs "
                                "it applies to no waypoint and is not enforced")
            return None
        found, hostnames = _targets(body, services, waypoints, problems)
        return _envelope(body, found, hostnames)

    def telemetry(body: Mapping[str, Any]) -> pb.L7Config:
        meta, spec = body["metadata"], body.get("spec") or {}
        if spec.get("selector"):
            problems.append(f"Telemetry {meta['namespace']}/{meta['name']}: a selector picks workloads' sidecars, "
                            "and this mesh has none: no waypoint applies it (use targetRefs to a waypoint "
                            "Gateway, or no selector for the whole namespace)")
            return _envelope(body, set(), [])
        if spec.get("targetRef") or spec.get("targetRefs"):
            found, _ = _targets(body, services, waypoints, problems)
            return _envelope(body, found, [])
        ns = meta["namespace"]
        return _envelope(body, {f"{w_ns}/{w}" for w_ns, w in waypoints if ns in (ROOT_NAMESPACE, w_ns)}, [])

    steps = (("VirtualService", virtual_service), ("DestinationRule", destination_rule),
             ("AuthorizationPolicy", policy), ("RequestAuthentication", policy), ("Telemetry", telemetry))
    for kind, step in steps:
        for body in snapshot.of_kind(kind):
            msg = guarded(body, errors, step, body)
            if msg is not None:
                out[f"{kind}/{msg.namespace}/{msg.name}"] = msg
    return out
