"""Translation of pods, services and waypoints into `Workload` and `Service` discovery messages.

Rules (as in Istio ambient mode):
- A pod is enrolled (tunnel HBONE) when its label `istio.io/dataplane-mode` is `ambient`, or its
  namespace's is and the pod's is not `none`.  Waypoint pods (label `gateway.networking.k8s.io/gateway-name`
  naming a waypoint Gateway) are not captured but accept HBONE, so they are HBONE with `is_waypoint`.
- A service uses the waypoint its own label `istio.io/use-waypoint` names, else its namespace's; a pod
  likewise (pod label, else namespace label).  `none` opts out.  `istio.io/use-waypoint-namespace` on
  the same object says where the Gateway lives (default: the object's namespace).  A waypoint takes
  service traffic when its `istio.io/waypoint-for` is `service` (the default) or `all`, workload
  traffic when it is `workload` or `all`; otherwise the object gets no waypoint.
- A waypoint is reached by its Service (`<name>.<ns>.svc.cluster.local`, a Service named like the
  Gateway or labelled with its name) or, without one, by the address of one of its ready pods (a pod whose
  `Ready` condition is False is not sent traffic: it may not listen yet, or be draining); its identity is
  its pods' service account (the Gateway's name when it has no pods yet).
- A service's endpoints are the running pods of its namespace whose labels include its selector;
  a named targetPort is resolved on each pod's container ports.  Its expected SANs are the identities of
  those pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.translate.guard import guarded
from mesh import defaults
from mesh.api.crossref import CLUSTER_DOMAIN
from mesh.api.kinds_gateway import (
    DATAPLANE_MODE_LABEL,
    GATEWAY_NAME_LABEL,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_PORT,
    is_ingress,
    is_waypoint,
)
from mesh.proto import discovery_pb2 as pb

DEFAULT_TRUST_DOMAIN = defaults.TRUST_DOMAIN
CLUSTER_ID = "Kubernetes"

_APP_PROTOCOLS = ("http2", "https", "http", "grpc-web", "grpc", "tcp", "tls", "mongo", "redis", "mysql")


def labels_of(body: Mapping[str, Any]) -> dict[str, str]:
    return dict((body.get("metadata") or {}).get("labels") or {})


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def hostname(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.{CLUSTER_DOMAIN}"


def workload_uid(pod: Mapping[str, Any]) -> str:
    """"<namespace>/<name>": stable across re-creation and restarts (not `metadata.uid`, which the store
    gives every object it creates)."""
    meta = pod["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def service_account(pod: Mapping[str, Any]) -> str:
    spec = pod.get("spec") or {}
    return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")


def identity(namespace: str, sa: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or []]
    if status.get("podIP") and status["podIP"] not in ips:
        ips.insert(0, status["podIP"])
    return ips


@dataclass
class Index:
    """What translation looks up repeatedly, built once per snapshot."""

    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    pods: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    waypoints: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (ns, name) -> Gateway
    ingresses: set[tuple[str, str]] = field(default_factory=set)  # (ns, name) of ingress Gateways
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # resources left out (`controlplane.translate.guard`)
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def waypoint_of(self, body: Mapping[str, Any], traffic: str) -> pb.GatewayAddress | None:
        """The waypoint that takes `traffic` ("service" or "workload") for a service or pod."""
        meta = body["metadata"]
        own = labels_of(body)
        ns_labels = self.namespaces.get(meta["namespace"], {})
        source = own if USE_WAYPOINT_LABEL in own else ns_labels
        name = source.get(USE_WAYPOINT_LABEL)
        if not name or name == "none":
            return None
        gw_ns = source.get(USE_WAYPOINT_NAMESPACE_LABEL) or meta["namespace"]
        gateway = self.waypoints.get((gw_ns, name))
        what = f"{body['kind']} {meta['namespace']}/{meta['name']}"
        if gateway is None:
            self.problems.append(f"{what} uses waypoint {gw_ns}/{name}, which does not exist: no waypoint for it")
            return None
        takes = labels_of(gateway).get(WAYPOINT_FOR_LABEL, "service")
        if takes not in (traffic, "all"):
            return None
        return self.gateway_address(gw_ns, name)

    def gateway_address(self, namespace: str, name: str) -> pb.GatewayAddress:
        out = pb.GatewayAddress(hbone_mtls_port=WAYPOINT_PORT, name=name, namespace=namespace)
        pods = [p for p in self.pods if p["metadata"]["namespace"] == namespace
                and labels_of(p).get(GATEWAY_NAME_LABEL) == name]
        service = next((s for s in self.services if s["metadata"]["namespace"] == namespace and
                        (s["metadata"]["name"] == name or labels_of(s).get(GATEWAY_NAME_LABEL) == name)), None)
        ready = [p for p in pods if healthy(p)]  # a waypoint pod not yet Ready is not an instance to send to
        if service is not None or not ready:
            svc_name = service["metadata"]["name"] if service is not None else name
            out.hostname.CopyFrom(pb.NamespacedHostname(namespace=namespace, hostname=hostname(svc_name, namespace)))
        else:
            address = next(ip for p in ready for ip in pod_ips(p))
            out.address.CopyFrom(pb.NetworkAddress(address=address))
        sa = service_account(pods[0]) if pods else name
        out.identity = identity(namespace, sa, self.trust_domain)
        return out

    def is_waypoint_pod(self, pod: Mapping[str, Any]) -> bool:
        """A waypoint's pod, or an ingress gateway's: a mesh proxy of its own, never captured by a node agent
        (and the identity it holds may open a discovery stream for its Gateway)."""
        name = labels_of(pod).get(GATEWAY_NAME_LABEL)
        key = (pod["metadata"]["namespace"], name)
        return bool(name) and (key in self.waypoints or key in self.ingresses)

    def is_ingress_pod(self, pod: Mapping[str, Any]) -> bool:
        name = labels_of(pod).get(GATEWAY_NAME_LABEL)
        return bool(name) and (pod["metadata"]["namespace"], name) in self.ingresses


def _named(body: Any, namespaced: bool = True) -> bool:
    """Has the metadata every step reads (a validated document always has)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("metadata"), Mapping):
        raise ValueError("no metadata")
    meta = body["metadata"]
    if not isinstance(meta.get("name"), str) or (namespaced and not isinstance(meta.get("namespace"), str)):
        raise ValueError("metadata.name or metadata.namespace is missing")
    if not isinstance(meta.get("labels") or {}, Mapping):
        raise ValueError("metadata.labels is not a mapping")
    return True


def build_index(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Index:
    index = Index(trust_domain=trust_domain)
    errors = index.errors
    for ns in snapshot.of_kind("Namespace"):
        if guarded(ns, errors, _named, ns, False):
            index.namespaces[ns["metadata"]["name"]] = labels_of(ns)
    index.pods = [p for p in snapshot.of_kind("Pod") if guarded(p, errors, _named, p)]
    index.services = [s for s in snapshot.of_kind("Service") if guarded(s, errors, _named, s)]
    for gw in snapshot.of_kind("Gateway"):
        if guarded(gw, errors, _named, gw) and is_waypoint(gw):
            index.waypoints[(gw["metadata"]["namespace"], gw["metadata"]["name"])] = gw
        elif guarded(gw, errors, _named, gw) and is_ingress(gw):
            index.ingresses.add((gw["metadata"]["namespace"], gw["metadata"]["name"]))
    return index


def enrolled(pod: Mapping[str, Any], index: Index) -> bool:
    mode = labels_of(pod).get(DATAPLANE_MODE_LABEL)
    if mode is not None:
        return mode == "ambient"
    return index.namespaces.get(pod["metadata"]["namespace"], {}).get(DATAPLANE_MODE_LABEL) == "ambient"


def canonical(labels: Mapping[str, str], name: str) -> tuple[str, str]:
    svc = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
           or labels.get("app") or name)
    rev = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
           or labels.get("version") or "latest")
    return svc, rev


def app_protocol(port: Mapping[str, Any]) -> str:
    if port.get("appProtocol"):
        return str(port["appProtocol"]).lower()
    name = str(port.get("name") or "").lower()
    return next((p for p in _APP_PROTOCOLS if name == p or name.startswith(p + "-")), "")


def target_port(port: Mapping[str, Any], pod: Mapping[str, Any] | None) -> int:
    """The pod port a service port maps to: numeric targetPort, a named container port, or the port."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in ((pod or {}).get("spec") or {}).get("containers") or []:
        for cp in container.get("ports") or []:
            if cp.get("name") == target:
                return int(cp["containerPort"])
    return 0


def endpoints_of(service: Mapping[str, Any], index: Index) -> list[dict[str, Any]]:
    selector = (service.get("spec") or {}).get("selector") or {}
    if not selector:
        return []
    ns = service["metadata"]["namespace"]
    return [p for p in index.pods if p["metadata"]["namespace"] == ns and selects(selector, labels_of(p))]


def healthy(pod: Mapping[str, Any]) -> bool:
    """Has an address, is running (or starting), and is not reported not Ready: a pod whose `Ready`
    condition is False is no endpoint, as in Kubernetes (a pod without conditions counts as ready)."""
    status = pod.get("status") or {}
    if not pod_ips(pod) or status.get("phase", "Running") not in ("Running", "Pending"):
        return False
    for condition in status.get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            return str(condition.get("status")) == "True"
    return True


def build_services(index: Index) -> dict[str, pb.Service]:
    out: dict[str, pb.Service] = {}
    for svc in index.services:
        msg = guarded(svc, index.errors, _service, svc, index)
        if msg is not None:
            out[f"{msg.namespace}/{msg.hostname}"] = msg
    return out


def _service(svc: Mapping[str, Any], index: Index) -> pb.Service:
    meta, spec = svc["metadata"], svc.get("spec") or {}
    ns = meta["namespace"]
    pods = endpoints_of(svc, index)
    vips = [ip for ip in [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])] if ip and ip != "None"]
    msg = pb.Service(name=meta["name"], namespace=ns, hostname=hostname(meta["name"], ns),
                     vips=list(dict.fromkeys(vips)), selector=spec.get("selector") or {})
    for port in spec.get("ports") or []:
        msg.ports.append(pb.ServicePort(service_port=port["port"], target_port=target_port(port, pods[0] if pods else None),
                                        name=port.get("name", ""), app_protocol=app_protocol(port)))
    waypoint = index.waypoint_of(svc, "service")
    if waypoint is not None:
        msg.waypoint.CopyFrom(waypoint)
    msg.subject_alt_names.extend(sorted({identity(ns, service_account(p), index.trust_domain) for p in pods}))
    for pod in pods:
        msg.endpoints.append(pb.ServiceEndpoint(workload_uid=workload_uid(pod), addresses=pod_ips(pod), healthy=healthy(pod)))
    return msg


def build_workloads(index: Index, services: Mapping[str, pb.Service] | None = None,
                    memberships: Mapping[str, Mapping[str, pb.PortList]] | None = None) -> dict[str, pb.Workload]:
    """The pods' Workloads; with `services` (what `build_services` made), only those services are named
    in them (one left out for an error is not half-served); `memberships` adds services by pod uid
    (ServiceEntries selecting pods, `controlplane.translate.serviceentries`)."""
    out: dict[str, pb.Workload] = {}
    services_of: dict[str, list[dict[str, Any]]] = {}
    for svc in index.services:
        meta = svc["metadata"]
        if services is not None and f"{meta['namespace']}/{hostname(meta['name'], meta['namespace'])}" not in services:
            continue
        for pod in guarded(svc, [], endpoints_of, svc, index) or []:  # reported by build_services
            services_of.setdefault(workload_uid(pod), []).append(svc)
    for pod in index.pods:
        msg = guarded(pod, index.errors, _workload, pod, index, services_of)
        if msg is not None:
            for key, ports in ((memberships or {}).get(msg.uid) or {}).items():
                msg.services[key].CopyFrom(ports)
            out[msg.uid] = msg
    return out


def _workload(pod: Mapping[str, Any], index: Index, services_of: Mapping[str, list[dict[str, Any]]]) -> pb.Workload:
    meta = pod["metadata"]
    labels = labels_of(pod)
    uid = workload_uid(pod)
    is_wp = index.is_waypoint_pod(pod)
    name, rev = canonical(labels, meta["name"])
    msg = pb.Workload(
        uid=uid, name=meta["name"], namespace=meta["namespace"], addresses=pod_ips(pod),
        service_account=service_account(pod), node=str((pod.get("spec") or {}).get("nodeName") or ""),
        # an ingress gateway's pod takes plain traffic from outside the mesh (no HBONE inbound)
        tunnel_protocol=pb.NONE if index.is_ingress_pod(pod) else pb.HBONE if is_wp or enrolled(pod, index) else pb.NONE,
        canonical_name=name, canonical_revision=rev, labels=labels,
        status=pb.HEALTHY if healthy(pod) else pb.UNHEALTHY, workload_type="pod", cluster_id=CLUSTER_ID,
        is_waypoint=is_wp,
    )
    if index.trust_domain != DEFAULT_TRUST_DOMAIN:
        msg.trust_domain = index.trust_domain
    if not is_wp:
        waypoint = index.waypoint_of(pod, "workload")
        if waypoint is not None:
            msg.waypoint.CopyFrom(waypoint)
    for svc in services_of.get(uid, []):
        key = f"{svc['metadata']['namespace']}/{hostname(svc['metadata']['name'], svc['metadata']['namespace'])}"
        ports = pb.PortList(ports=[pb.PortMapping(service_port=p["port"], target_port=target_port(p, pod))
                                   for p in (svc.get("spec") or {}).get("ports") or []])
        msg.services[key].CopyFrom(ports)
    return msg
