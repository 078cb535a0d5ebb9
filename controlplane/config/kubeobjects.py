"""What the Kubernetes source watches, and how a Kubernetes object becomes one of the mesh's documents.

Pure: no client, no I/O.  `RESOURCES` lists every watched collection; `to_document(resource, obj)` maps
an object as the API server sends it (JSON, camelCase) to the document the store validates and
translation reads, the same shape `meshctl apply` and the local cluster register:

- Pod: labels; `spec.nodeName`, `serviceAccountName`, `hostNetwork`, each container's name and ports;
  `status.podIP`, `podIPs`, `hostIP`, `phase`, `conditions`.  (The rest of a pod is the kubelet's business.)
- Service: labels; the spec fields the mesh's Service schema knows (selector, ports, clusterIP, ...),
  without the "None" of a headless service's `clusterIPs`.
- Namespace, ServiceAccount: name and labels.
- The Istio kinds, waypoint and ingress Gateways (classes istio-waypoint and istio), HTTPRoutes and
  GRPCRoutes: labels, annotations (but kubectl's last-applied copy) and the spec as written, so that they
  pass or fail the same strict validator as `meshctl apply`.  A Gateway of another class is not the mesh's:
  it maps to nothing.
- Secret: only those an ingress Gateway names (`referenced_secrets`), watched one by one
  (`controlplane.config.kubesecrets`): type and data.
- Node, EndpointSlice: not documents (`stored=False`); the source keeps them as they are (`objects()`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.api.errors import FieldError
from mesh.api.kinds_core import SERVICE_SPEC
from mesh.api.kinds_gateway import is_ingress, is_waypoint
from mesh.api.kinds_routes import ROUTE_KINDS
from mesh.api.validate import Ref

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@dataclass(frozen=True)
class Resource:
    """One watched collection: `kind` in `group`/`version` (`group` "" is the core API), `plural` in URLs."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    stored: bool = True  # mapped to documents in the store; False: kept as objects only

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def custom(self) -> bool:
        """Served by a CustomResourceDefinition (listed with the custom objects API)."""
        return self.group.endswith(".istio.io") or self.group == "gateway.networking.k8s.io"

    @property
    def has_status(self) -> bool:
        """The mesh may write this kind's status (a condition saying whether it was accepted).  A route's
        status is its parents' (`controlplane.config.kuberoutes`), not one condition."""
        return self.custom and self.kind not in ROUTE_KINDS

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: tuple[Resource, ...] = (
    Resource("Namespace", "", "v1", "namespaces", namespaced=False),
    Resource("ServiceAccount", "", "v1", "serviceaccounts"),
    Resource("Service", "", "v1", "services"),
    Resource("Pod", "", "v1", "pods"),
    Resource("Node", "", "v1", "nodes", namespaced=False, stored=False),
    Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", stored=False),
    Resource("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies"),
    Resource("PeerAuthentication", "security.istio.io", "v1", "peerauthentications"),
    Resource("RequestAuthentication", "security.istio.io", "v1", "requestauthentications"),
    Resource("VirtualService", "networking.istio.io", "v1", "virtualservices"),
    Resource("DestinationRule", "networking.istio.io", "v1", "destinationrules"),
    Resource("ServiceEntry", "networking.istio.io", "v1", "serviceentries"),
    Resource("Telemetry", "telemetry.istio.io", "v1", "telemetries"),
    Resource("Gateway", "gateway.networking.k8s.io", "v1", "gateways"),
    Resource("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
    Resource("GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes"),
)
# Not in RESOURCES: a Secret is watched only while an ingress Gateway names it (`kubesecrets`), by name.
SECRET = Resource("Secret", "", "v1", "secrets")
_SERVICE_FIELDS = tuple(SERVICE_SPEC.fields)
_POD_STATUS = ("podIP", "podIPs", "hostIP", "phase", "conditions")
_PORT_FIELDS = ("containerPort", "name", "protocol")


def resource_for(kind: str) -> Resource | None:
    return next((r for r in RESOURCES if r.kind == kind), None)


def name_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of an object ("" namespace for cluster-scoped ones)."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def ref_of(resource: Resource, obj: Mapping[str, Any]) -> Ref:
    """The store's name for `obj`, whether or not it maps to a document."""
    namespace, name = name_of(obj)
    return Ref(resource.kind, namespace if resource.namespaced else "", name)


def describe(resource: Resource, obj: Mapping[str, Any]) -> str:
    """`VirtualService default/reviews`, `Namespace default`: for log lines and messages."""
    namespace, name = name_of(obj)
    return f"{resource.kind} {namespace}/{name}" if namespace else f"{resource.kind} {name}"


def refusal_message(errors: Iterable[FieldError]) -> str:
    """The validator's findings in one line, `spec.http[0].timeout: ...; ...`: each reads as `meshctl
    apply` prints it, without the file and document that an object from the API does not have."""
    return "; ".join(str(FieldError(e.path, e.message)) for e in errors)


def to_document(resource: Resource, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The mesh's document for `obj`, or None when it is not the mesh's (see the module docstring)."""
    if not resource.stored:
        return None
    if resource.kind == "Gateway" and not (is_waypoint({"kind": "Gateway", **obj}) or is_ingress({"kind": "Gateway", **obj})):
        return None
    if resource.kind == "Secret":
        secret: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": _metadata(obj, annotations=False),
                                  "type": obj.get("type") or "Opaque"}
        if obj.get("data"):
            secret["data"] = dict(obj["data"])
        return secret
    doc: dict[str, Any] = {"apiVersion": resource.api_version, "kind": resource.kind,
                           "metadata": _metadata(obj, annotations=resource.custom)}
    spec = obj.get("spec")
    if resource.kind == "Pod":
        doc["spec"] = _pod_spec(spec or {})
        status = {k: v for k, v in (obj.get("status") or {}).items() if k in _POD_STATUS and v is not None}
        if status:
            doc["status"] = status
    elif resource.kind == "Service":
        doc["spec"] = _service_spec(spec or {})
    elif resource.custom and spec is not None:
        doc["spec"] = spec
    return doc


def referenced_secrets(gateways: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret an ingress Gateway's listeners name for their certificate.  Only a
    Secret of the Gateway's own namespace can be used (no ReferenceGrant), so only those are named here."""
    out = set()
    for gw in gateways:
        if not is_ingress({"kind": "Gateway", **gw}):
            continue
        namespace = (gw.get("metadata") or {}).get("namespace") or ""
        for listener in (gw.get("spec") or {}).get("listeners") or []:
            for ref in ((listener.get("tls") or {}).get("certificateRefs") or []):
                if ref.get("group", "") in ("", "core") and ref.get("kind", "Secret") == "Secret" \
                        and ref.get("namespace", namespace) == namespace and ref.get("name"):
                    out.add((namespace, str(ref["name"])))
    return out


def _metadata(obj: Mapping[str, Any], *, annotations: bool) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out: dict[str, Any] = {"name": meta.get("name")}
    if meta.get("namespace"):
        out["namespace"] = meta["namespace"]
    if meta.get("labels"):
        out["labels"] = dict(meta["labels"])
    kept = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED} if annotations else {}
    if kept:
        out["annotations"] = kept
    return out


def _pod_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"containers": [_container(c) for c in spec.get("containers") or []]}
    if spec.get("nodeName"):
        out["nodeName"] = spec["nodeName"]
    account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    if account:
        out["serviceAccountName"] = account
    if spec.get("hostNetwork"):
        out["hostNetwork"] = True
    return out


def _container(container: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": container.get("name")}
    ports = [{k: p[k] for k in _PORT_FIELDS if p.get(k) is not None} for p in container.get("ports") or []]
    if ports:
        out["ports"] = ports
    return out


def _service_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k in _SERVICE_FIELDS and v is not None}
    if "clusterIPs" in out:
        out["clusterIPs"] = [ip for ip in out["clusterIPs"] if ip != "None"]
        if not out["clusterIPs"]:
            del out["clusterIPs"]
    return out
