"""Translation of ServiceEntries into the `Service` and `Workload` messages node agents route with.

Rules (as Istio does for ambient mode):
- Each host of a ServiceEntry is one `Service` (resource name `<ns>/<host>`), with the entry's ports
  (`number` -> service port, `targetPort`, `name`, `protocol` as the app protocol), `location`
  (`mesh_external`), `resolution` and `exportTo` (`.` becomes the entry's namespace; empty: everywhere).
  A host that a Kubernetes Service of the same namespace already has is left out and reported.
- Addresses: the entry's `addresses` (IPs, or /32 and /128 CIDRs; wider ranges cannot be a VIP and are
  reported); without any, a non-wildcard host with resolution STATIC or DNS gets one allocated from
  240.240.0.0/16 (`allocate`), as Istio's auto-allocation does, so that the DNS proxy can answer for it.
  Allocation is a function of `<namespace>/<host>` alone (a hash, probing on collision in name order),
  so it is the same after a control-plane restart and unique within one translation.
- Endpoints:
  - STATIC with `endpoints`: each IP endpoint is a `Workload` (uid `Kubernetes/networking.istio.io/
    ServiceEntry/<ns>/<name>/<address>`, tunnel NONE: reached in plain TCP) unless it is the address of
    a known pod, which is then the endpoint itself; `endpoints[].ports` (by port name) give its target
    ports, `labels` its labels;
  - DNS: each endpoint address, or the host itself when there are none, is a `Workload` with `hostname`
    set and no address: the agent resolves it when it connects;
  - `workloadSelector`: the pods of the entry's namespace whose labels match (in-mesh workloads); they
    list the service in their `Workload.services` (`memberships`);
  - NONE: no endpoints; connections go where the application sent them.
- A waypoint: the entry's own `istio.io/use-waypoint` label, else its namespace's (as for Services).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.translate.guard import guarded
from controlplane.translate.workloads import (
    CLUSTER_ID,
    Index,
    _named,
    healthy,
    hostname,
    identity,
    labels_of,
    pod_ips,
    selects,
    service_account,
    workload_uid,
)
from mesh.api.kinds_networking import is_ip
from mesh.proto import discovery_pb2 as pb

AUTO_ALLOCATE_NETWORK = ipaddress.IPv4Network("240.240.0.0/16")
KIND = "ServiceEntry"
_RESOLUTIONS = {"STATIC": pb.RESOLUTION_STATIC, "DNS": pb.RESOLUTION_DNS, "DNS_ROUND_ROBIN": pb.RESOLUTION_DNS,
                "NONE": pb.RESOLUTION_NONE}


@dataclass
class EntryTranslation:
    """What the ServiceEntries of a snapshot become."""

    services: dict[str, pb.Service] = field(default_factory=dict)  # "<ns>/<host>" -> Service
    workloads: dict[str, pb.Workload] = field(default_factory=dict)  # the entries' own endpoints, by uid
    memberships: dict[str, dict[str, pb.PortList]] = field(default_factory=dict)  # pod uid -> key -> ports


def entry_uid(namespace: str, name: str, address: str) -> str:
    return f"{CLUSTER_ID}/networking.istio.io/{KIND}/{namespace}/{name}/{address}"


def _slot(key: str) -> int:
    size = AUTO_ALLOCATE_NETWORK.num_addresses - 2  # neither .0.0 nor .255.255
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % size + 1


def allocate(keys: list[str]) -> dict[str, str]:
    """An address of 240.240.0.0/16 for each `<namespace>/<host>`: stable (a hash of the key) and unique
    (a collision takes the next free slot, the keys taken in sorted order)."""
    size = AUTO_ALLOCATE_NETWORK.num_addresses - 2
    taken: set[int] = set()
    out: dict[str, str] = {}
    for key in sorted(set(keys)):
        slot = _slot(key)
        while slot in taken:
            slot = slot % size + 1
        taken.add(slot)
        out[key] = str(AUTO_ALLOCATE_NETWORK.network_address + slot)
    return out


def _vips(spec: Mapping[str, Any], where: str, problems: list[str]) -> list[str]:
    out = []
    for text in spec.get("addresses") or []:
        net = ipaddress.ip_network(str(text), strict=False)
        if net.num_addresses == 1:
            out.append(str(net.network_address))
        else:
            problems.append(f"{where}: address range {text} cannot be a service address: only single "
                            "addresses are routed (the range is ignored)")
    return list(dict.fromkeys(out))


def exported_to(spec: Mapping[str, Any], namespace: str) -> list[str]:
    names = [str(n) for n in spec.get("exportTo") or []]
    if not names or "*" in names:
        return []
    return list(dict.fromkeys(namespace if n == "." else n for n in names))


def build_service_entries(snapshot: Any, index: Index) -> EntryTranslation:
    """Every ServiceEntry of the snapshot; one that cannot be translated is left out and reported in
    `index.errors`, a questionable part of one in `index.problems`."""
    out = EntryTranslation()
    entries = [e for e in snapshot.of_kind(KIND) if guarded(e, index.errors, _named, e)]
    allocated = allocate([key for e in entries for key in guarded(e, [], _wanted, e) or []])  # errors: by _entry
    taken = {f"{s['metadata']['namespace']}/{hostname(s['metadata']['name'], s['metadata']['namespace'])}"
             for s in index.services}
    for entry in sorted(entries, key=lambda e: (e["metadata"]["namespace"], e["metadata"]["name"])):
        part = guarded(entry, index.errors, _entry, entry, index, allocated, taken | set(out.services))
        if part is None:
            continue
        out.services.update(part.services)
        out.workloads.update(part.workloads)
        for uid, keys in part.memberships.items():
            out.memberships.setdefault(uid, {}).update(keys)
    return out


def _wanted(body: Mapping[str, Any]) -> list[str]:
    """The `<ns>/<host>` keys of an entry that get an allocated address: hosts that are not wildcards, of
    an entry without `addresses` whose resolution is STATIC or DNS."""
    spec = body.get("spec") or {}
    if spec.get("addresses") or (spec.get("resolution") or "NONE") == "NONE":
        return []
    return [f"{body['metadata']['namespace']}/{h}" for h in spec["hosts"] if not h.startswith("*")]


def _entry(body: Mapping[str, Any], index: Index, allocated: Mapping[str, str], taken: set[str]) -> EntryTranslation:
    meta, spec = body["metadata"], body.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    where = f"{KIND} {ns}/{name}"
    resolution = _RESOLUTIONS[spec.get("resolution") or "NONE"]
    external = (spec.get("location") or "MESH_EXTERNAL") == "MESH_EXTERNAL"
    ports = [pb.ServicePort(service_port=int(p["number"]), target_port=int(p.get("targetPort") or 0),
                            name=str(p["name"]), app_protocol=str(p.get("protocol") or "").lower())
             for p in spec.get("ports") or []]
    out = EntryTranslation()
    selector = (spec.get("workloadSelector") or {}).get("labels")
    pods = [p for p in index.pods if p["metadata"]["namespace"] == ns and selects(selector, labels_of(p))] \
        if selector else []
    endpoints = _endpoint_workloads(body, index, resolution)
    waypoint = index.waypoint_of(body, "service")
    vips = _vips(spec, where, index.problems)
    pod_uids = {workload_uid(p) for p in index.pods}
    sans = list(spec.get("subjectAltNames") or []) or sorted(
        {identity(ns, service_account(p), index.trust_domain) for p in pods})
    for host in spec["hosts"]:
        key = f"{ns}/{host}"
        if key in taken:
            index.problems.append(f"{where}: host {host} is already a service of namespace {ns}: the entry's "
                                  "host is left out")
            continue
        svc = pb.Service(name=host, namespace=ns, hostname=host, ports=ports, resolution=resolution,
                         mesh_external=external, export_to=exported_to(spec, ns), source_kind=KIND,
                         source_name=name, subject_alt_names=sans)
        svc.vips.extend(vips or ([allocated[key]] if key in allocated else []))
        if waypoint is not None:
            svc.waypoint.CopyFrom(waypoint)
        if resolution == pb.RESOLUTION_DNS and not endpoints and not host.startswith("*"):
            endpoints_here: list[tuple[pb.Workload, dict[str, int]]] = [(_dns_workload(body, host, {}), {})]
        else:
            endpoints_here = endpoints
        for w, port_names in endpoints_here:
            mapping = pb.PortList(ports=[pb.PortMapping(service_port=p.service_port,
                                                        target_port=port_names.get(p.name, p.target_port))
                                         for p in ports])
            if w.uid in pod_uids:
                out.memberships.setdefault(w.uid, {})[key] = mapping
            else:
                w = out.workloads.get(w.uid) or w
                w.services[key].CopyFrom(mapping)
                out.workloads[w.uid] = w
            svc.endpoints.append(pb.ServiceEndpoint(workload_uid=w.uid, addresses=list(w.addresses), healthy=True))
        for pod in pods:
            uid = workload_uid(pod)
            out.memberships.setdefault(uid, {})[key] = pb.PortList(
                ports=[pb.PortMapping(service_port=p.service_port, target_port=p.target_port) for p in ports])
            svc.endpoints.append(pb.ServiceEndpoint(workload_uid=uid, addresses=pod_ips(pod), healthy=healthy(pod)))
        out.services[key] = svc
    return out


def _endpoint_workloads(body: Mapping[str, Any], index: Index,
                        resolution: int) -> list[tuple[pb.Workload, dict[str, int]]]:
    """The entry's listed endpoints as workloads, with each one's target port by port name."""
    spec = body.get("spec") or {}
    if resolution == pb.RESOLUTION_NONE:
        return []
    by_ip = {ip: p for p in index.pods for ip in pod_ips(p)}
    out: list[tuple[pb.Workload, dict[str, int]]] = []
    for ep in spec.get("endpoints") or []:
        address = str(ep["address"])
        port_names = {str(k): int(v) for k, v in (ep.get("ports") or {}).items()}
        if is_ip(address):
            pod = by_ip.get(address)
            if pod is not None:
                out.append((pb.Workload(uid=workload_uid(pod)), port_names))
                continue
            out.append((_static_workload(body, ep, address), port_names))
        elif resolution == pb.RESOLUTION_DNS:
            out.append((_dns_workload(body, address, ep), port_names))
        else:
            raise ValueError(f"endpoint address {address!r} is not an IP address (resolution STATIC)")
    return out


def _entry_workload(body: Mapping[str, Any], address: str, ep: Mapping[str, Any]) -> pb.Workload:
    meta = body["metadata"]
    ns = meta["namespace"]
    labels = {**labels_of(body), **(ep.get("labels") or {})}
    return pb.Workload(uid=entry_uid(ns, meta["name"], address), name=meta["name"], namespace=ns,
                       service_account=str(ep.get("serviceAccount") or "default"),
                       tunnel_protocol=pb.NONE, canonical_name=meta["name"], canonical_revision="latest",
                       labels=labels, status=pb.HEALTHY, workload_type="serviceentry", cluster_id=CLUSTER_ID,
                       network=str(ep.get("network") or ""))


def _static_workload(body: Mapping[str, Any], ep: Mapping[str, Any], address: str) -> pb.Workload:
    w = _entry_workload(body, address, ep)
    w.addresses.append(address)
    return w


def _dns_workload(body: Mapping[str, Any], name: str, ep: Mapping[str, Any]) -> pb.Workload:
    w = _entry_workload(body, name, ep)
    w.hostname = name
    return w
