"""Ingress gateways deployed on Kubernetes: what Istio's gateway deployment controller does for a Gateway of
class istio.

For each ingress Gateway in the store the control plane keeps three objects in the Gateway's namespace, all
named `<gateway>-istio` (as Istio names them), labelled `gateway.istio.io/managed:
istio.io-gateway-controller` and owned by the Gateway (`ownerReferences`, `controller: true`), so Kubernetes'
garbage collector deletes them with it:
- a ServiceAccount: the gateway's identity, `spiffe://<td>/ns/<ns>/sa/<gateway>-istio`;
- a Deployment running the waypoint image's command in gateway mode (`python -m waypoint.main` with one
  `--listener` per servable listener, as `localcluster.ingress` runs it), its pods labelled
  `gateway.networking.k8s.io/gateway-name: <gateway>` (how translation finds them) and out of capture;
  each Secret an HTTPS listener uses is mounted read-only (`tls.crt`, `tls.key`, mode 0440, the pod's
  group) and named in the listener's flag; the pods may bind ports below 1024
  (`net.ipv4.ip_unprivileged_port_start=0`, a safe sysctl, as Istio's gateway pods set it).  A hash of the
  flags and the certificates is a pod template annotation, so a new certificate rolls the pods (the
  process does not reload it);
- a Service of type LoadBalancer with the listeners' ports (and 15021, the readiness port): its address
  is the Gateway's (`controlplane.config.kubegateways`).

They are written with server-side apply (field manager `istio.io/gateway-controller`, forced: the fields
are this controller's), which creates or updates in one request and leaves fields others own alone.  Every
change of a Gateway or Secret in the store, and a look every `resync` seconds (an object deleted by hand
comes back), applies them again; applying an unchanged object changes nothing.

A Gateway is left alone, as in Istio, when it asks for a manual deployment: `spec.addresses` holding an
address that is not an IP (a `Hostname` naming the user's own Service) or more than one address.  Istio
has no annotation for this; the `gateway.istio.io/managed` label only marks what the controller made.

What is deployed is the Gateway as the store holds it: its version the validator accepted (a refused
update changes nothing, as for the rest of the mesh); the API is asked only for its `uid`.  Everything is
worked out before anything is written: a Gateway whose objects cannot be made (a name too long for its
Service, a listener on a port the proxy uses itself) gets none, with a warning in the log; so does a
Gateway with no listener to serve (every HTTPS listener's Secret missing or unusable: its status says
why), which keeps what it had if it had some.  A write that fails is retried at the next look.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient, AppsV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from controlplane.config.follower import StoreFollower
from controlplane.config.kuberoutes import NOT_FOUND, REQUEST_TIMEOUT
from controlplane.config.store import Store
from controlplane.translate import ingress as translate_ingress
from mesh import defaults
from mesh.api.kinds_gateway import (
    DATAPLANE_MODE_LABEL,
    GATEWAY_GROUP,
    GATEWAY_NAME_LABEL,
    INGRESS_CLASS,
    ingress_service_account,
)
from mesh.api.validate import Ref
from mesh.errors import MeshError

log = logging.getLogger(__name__)

RESYNC = 60.0  # seconds between looks that apply every gateway's objects again
MANAGED_LABEL = "gateway.istio.io/managed"  # Istio's label on what its gateway controller made
MANAGED_VALUE = "istio.io-gateway-controller"
FIELD_MANAGER = "istio.io/gateway-controller"
REVISION_ANNOTATION = "ingress.ambient.mesh/revision"  # on the pod template: listeners and certificates
APPLY = "application/apply-patch+yaml"
CERT_ROOT = "/var/run/secrets/gateway"  # each Secret's volume at <root>/<secret name>
READINESS_PORT = defaults.READINESS_PORT
RESERVED_PORTS = (15000, defaults.METRICS_PORT, READINESS_PORT)  # the proxy's admin, metrics, readiness
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class GatewayDeployError(MeshError):
    """An ingress Gateway whose objects cannot be made (nothing of it is written)."""


@dataclass(frozen=True)
class DeployOptions:
    """What the gateway pods run and where they find the control plane (as `daemonset/waypoint/`)."""

    image: str = "ghcr.io/ambient-mesh/ambient-mesh:0.1.0"
    control_plane: str = f"istiod.istio-system.svc:{defaults.CONTROLPLANE_GRPC_PORT}"
    trust_domain: str = "cluster.local"
    replicas: int = 1
    log_level: str = "info"


def is_managed(gateway: Mapping[str, Any]) -> bool:
    """Deployed by this controller: no `spec.addresses`, or one IP address (Istio's rule for manual
    deployment is the opposite: a Hostname or other non-IP address, or several)."""
    addresses = (gateway.get("spec") or {}).get("addresses") or []
    if not addresses:
        return True
    return len(addresses) == 1 and addresses[0].get("type", "IPAddress") == "IPAddress"


class _Secrets:
    """The store's Secrets as `translate_ingress.certificate` looks them up."""

    def __init__(self, snapshot: Any) -> None:
        self._snapshot = snapshot

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._snapshot.get(kind, namespace, name)
        return found


def manifests(gateway: Mapping[str, Any], snapshot: Any, options: DeployOptions = DeployOptions(),
              problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The ServiceAccount, Deployment and Service of one ingress Gateway as the API sent it (its `uid` is
    their owner's); [] when none of its listeners can be served.  `GatewayDeployError` when they cannot be
    made at all.  Why a listener is left out is added to `problems`."""
    meta = gateway.get("metadata") or {}
    namespace, name, uid = str(meta.get("namespace") or ""), str(meta.get("name") or ""), str(meta.get("uid") or "")
    where = f"ingress Gateway {namespace}/{name}"
    if not namespace or not name or not uid:
        raise GatewayDeployError(f"{where}: metadata.namespace, metadata.name and metadata.uid are required")
    account = ingress_service_account(name)
    if len(account) > 63 or not _DNS_LABEL.match(account):
        raise GatewayDeployError(f"{where}: its Service {account!r} is not a valid Service name (a DNS label of at most "
                                 f"63 characters, starting with a letter): use a Gateway name of at most "
                                 f"{63 - len(account) + len(name)} characters")
    reserved = sorted({li.get("port") for li in (gateway.get("spec") or {}).get("listeners") or []} & set(RESERVED_PORTS))
    if reserved:
        raise GatewayDeployError(f"{where}: port {reserved[0]} is the gateway pod's own (admin, metrics and "
                                 f"readiness use {', '.join(map(str, RESERVED_PORTS))}): use another listener port")
    gw = translate_ingress.ingress_gateway({"metadata": {"namespace": namespace, "name": name},
                                            "spec": gateway.get("spec") or {}})
    args: list[str] = []
    secrets: dict[str, str] = {}  # secret name -> volume name
    certs: list[list[str]] = []
    ports: dict[int, str] = {}
    for li in gw.listeners:
        if li.protocol == "HTTPS":
            cert = translate_ingress.certificate(gw, li, _Secrets(snapshot))
            if cert.reason:
                if problems is not None:
                    problems.append(f"{cert.problem}: the listener is not deployed")
                continue
            secret = str(li.certificate_refs[0]["name"])
            secrets.setdefault(secret, f"cert-{len(secrets)}")
            base = f"{CERT_ROOT}/{secret}"
            args += ["--listener", f"{li.name}=HTTPS:{li.port}:{base}/{translate_ingress.CERT_KEY}:"
                                   f"{base}/{translate_ingress.KEY_KEY}"]
            certs.append([secret, cert.chain.hex(), cert.key.hex()])
        elif li.protocol == "HTTP":
            args += ["--listener", f"{li.name}=HTTP:{li.port}"]
        else:
            continue
        ports.setdefault(li.port, f"{li.protocol.lower()}-{li.port}")
    if not ports:
        return []
    revision = hashlib.sha256(json.dumps([args, certs, options.image]).encode()).hexdigest()[:16]
    labels = {MANAGED_LABEL: MANAGED_VALUE, GATEWAY_NAME_LABEL: name}
    owner = {"apiVersion": f"{GATEWAY_GROUP}/v1", "kind": "Gateway", "name": name, "uid": uid, "controller": True}

    def metadata() -> dict[str, Any]:
        return {"name": account, "namespace": namespace, "labels": dict(labels), "ownerReferences": [dict(owner)]}

    service_account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata()}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": metadata(), "spec": {
        "type": "LoadBalancer",
        "selector": {GATEWAY_NAME_LABEL: name},
        "ports": [{"name": "status-port", "port": READINESS_PORT, "targetPort": READINESS_PORT, "protocol": "TCP"}]
                 + [{"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                    for port, port_name in sorted(ports.items()) if port != READINESS_PORT]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(), "spec": {
        "replicas": options.replicas,
        "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
        "template": {
            "metadata": {"labels": {**labels, DATAPLANE_MODE_LABEL: "none"},
                         "annotations": {REVISION_ANNOTATION: revision, "prometheus.io/scrape": "true",
                                         "prometheus.io/port": str(defaults.METRICS_PORT),
                                         "prometheus.io/path": "/metrics"}},
            "spec": _pod_spec(name, account, args, secrets, sorted(ports), options)}}}
    return [service_account, deployment, service]


def _pod_spec(name: str, account: str, listeners: list[str], secrets: Mapping[str, str], ports: list[int],
              options: DeployOptions) -> dict[str, Any]:
    args = ["--name", name, "--namespace", "$(POD_NAMESPACE)", "--node", "$(NODE_NAME)",
            "--service-account", account, "--control-plane", options.control_plane,
            "--root-cert", "/var/run/secrets/istio/root-cert.pem", "--token-file", "/var/run/secrets/tokens/istio-token",
            "--trust-domain", options.trust_domain, "--metrics-listen", f"0.0.0.0:{defaults.METRICS_PORT}",
            "--ready-listen", f"0.0.0.0:{READINESS_PORT}", "--admin-listen", "127.0.0.1:15000",
            "--drain-seconds", "20", "--log-level", options.log_level, *listeners]
    env = [{"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}
           for var, path in (("NODE_NAME", "spec.nodeName"), ("POD_NAME", "metadata.name"),
                             ("POD_NAMESPACE", "metadata.namespace"))]
    mounts = [{"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": True},
              {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
        {"name": "tmp", "emptyDir": {}}]
    for secret, volume in secrets.items():
        mounts.append({"name": volume, "mountPath": f"{CERT_ROOT}/{secret}", "readOnly": True})
        volumes.append({"name": volume, "secret": {
            "secretName": secret, "defaultMode": 0o440,
            "items": [{"key": translate_ingress.CERT_KEY, "path": translate_ingress.CERT_KEY},
                      {"key": translate_ingress.KEY_KEY, "path": translate_ingress.KEY_KEY}]}})
    container = {
        "name": "istio-proxy", "image": options.image, "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "waypoint.main"], "args": args, "env": env,
        "ports": [{"name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP"},
                  {"name": "http-metrics", "containerPort": defaults.METRICS_PORT, "protocol": "TCP"}]
                 + [{"containerPort": port, "protocol": "TCP"} for port in ports
                    if port not in (READINESS_PORT, defaults.METRICS_PORT)],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": READINESS_PORT},
                           "periodSeconds": 5, "timeoutSeconds": 2},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts}
    return {"serviceAccountName": account, "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 30, "nodeSelector": {"kubernetes.io/os": "linux"},
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1337, "runAsGroup": 1337, "fsGroup": 1337,
                                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
            "containers": [container], "volumes": volumes}


class GatewayDeployer(StoreFollower):
    """Keeps each ingress Gateway's objects applied (see the module docstring)."""

    def __init__(self, api: ApiClient, store: Store, *, options: DeployOptions = DeployOptions(),
                 resync: float = RESYNC) -> None:
        super().__init__(store, "kube-gateway-deploy", what="deploy the ingress Gateways", every=resync,
                         wants=lambda event: bool({"Gateway", "Secret"} & set(event.kinds)))
        self._custom = CustomObjectsApi(api)
        self._core = CoreV1Api(api)
        self._apps = AppsV1Api(api)
        self._options = options
        self._refused: dict[Ref, str] = {}  # the last problem logged per Gateway (each said once)

    def work(self) -> bool:
        snapshot = self._store.snapshot()
        failed = False
        for body in snapshot.of_kind("Gateway"):
            if (body.get("spec") or {}).get("gatewayClassName") != INGRESS_CLASS:
                continue
            ref = Ref("Gateway", str(body["metadata"].get("namespace") or ""), str(body["metadata"]["name"]))
            try:
                self.deploy(ref, body, snapshot)
            except GatewayDeployError as exc:
                if self._refused.get(ref) != str(exc):
                    log.warning("kubernetes gateway deployment: %s", exc)
                    self._refused[ref] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one Gateway's failure is that Gateway's alone
                log.warning("kubernetes gateway deployment: cannot deploy %s: %s", ref, exc)
                failed = True
        return failed

    def deploy(self, ref: Ref, body: Mapping[str, Any], snapshot: Any) -> list[dict[str, Any]]:
        """Apply the objects of one Gateway as the store holds it (its accepted version: a version the
        validator refused changes nothing); what was applied ([] for a manual deployment or nothing to
        serve).  The API is asked only for the Gateway's `uid`, their owner's."""
        if not is_managed(body):
            return []
        found: Any
        try:
            found = self._custom.get_namespaced_custom_object(GATEWAY_GROUP, "v1", ref.namespace, "gateways",
                                                                ref.name, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == NOT_FOUND:  # deleted meanwhile: its objects go with it
                return []
            raise
        uid = ((found.get("metadata") or {}).get("uid") or "") if isinstance(found, dict) else ""
        gateway = {**body, "metadata": {**body["metadata"], "uid": uid}}
        problems: list[str] = []
        objects = manifests(gateway, snapshot, self._options, problems)
        said = "; ".join(problems) if objects else "; ".join([*problems, "no listener can be served: not deployed"])
        if said and self._refused.get(ref) != said:
            log.warning("kubernetes gateway deployment: %s: %s", ref, said)
        if said:
            self._refused[ref] = said
        else:
            self._refused.pop(ref, None)
        for obj in objects:
            self._apply(obj)
        if objects:
            log.debug("kubernetes gateway deployment: applied %s", ref)
        return objects

    def _apply(self, obj: dict[str, Any]) -> None:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        kwargs: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY,
                                  "_request_timeout": REQUEST_TIMEOUT, "_preload_content": False}
        response: Any
        if obj["kind"] == "Deployment":
            response = self._apps.patch_namespaced_deployment(name, namespace, obj, **kwargs)
        elif obj["kind"] == "Service":
            response = self._core.patch_namespaced_service(name, namespace, obj, **kwargs)
        else:
            response = self._core.patch_namespaced_service_account(name, namespace, obj, **kwargs)
        try:
            response.data  # noqa: B018 - read to the end: an unread answer must not go back to the pool
        finally:
            response.release_conn()
