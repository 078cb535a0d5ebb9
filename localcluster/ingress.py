"""Ingress gateway pods of the local cluster: what Istio's gateway deployment controller and kind's port
mappings do for a `Gateway` of class `istio`.

For every such Gateway the cluster runs one pod named after it in its namespace, as a waypoint pod is run
(`localcluster.waypoints`: placement, sandbox, token, readiness probe), with what makes it an ingress:
- its service account is `<gateway>-istio` (its identity `spiffe://<td>/ns/<ns>/sa/<gateway>-istio`);
- the proxy runs in gateway mode (`waypoint.gateway`): one `--listener` per Gateway listener, an HTTPS
  listener with the PEM chain and key of its Secret, written into the pod's own directory (0600, its user's
  alone) as a kubelet mounts a Secret volume; the pod's namespace lets its unprivileged user bind ports
  below 1024 (`net.ipv4.ip_unprivileged_port_start=0`, as Istio's gateway pods set it);
- its listeners are published on the host's loopback by a userspace forwarder (`localcluster.hostports`,
  one process per gateway, in the host's namespace, dialling the pod from its node's namespace: no rule
  in the host's iptables), each on a free port; the forwarder's ports go into the pod's annotation
  `ingress.ambient.mesh/published` when it is set Ready, from which the control plane writes the
  Gateway's `status.addresses` and listener status (`controlplane.translate.ingressstatus`).
A change of the Gateway's listeners or of a certificate it uses replaces the pod (a new revision).  An
HTTPS listener whose Secret is missing or unusable is left out of the pod (its status says why), and a
Gateway with no listener left gets no pod.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.translate import ingress as translate_ingress
from controlplane.translate.ingressstatus import PUBLISHED_ANNOTATION, format_published
from localcluster import components, processes
from localcluster.plan import node_netns
from localcluster.processes import ProcessRecord
from localcluster.waypoints import STOP_GRACE, WaypointController, WaypointPod, desired
from mesh import netns as mnetns
from mesh.api.kinds_gateway import DATAPLANE_MODE_LABEL, INGRESS_CLASS, ingress_service_account
from mesh.errors import MeshError

log = logging.getLogger("localcluster.ingress")

PUBLISH_HOST = "127.0.0.1"  # the host's loopback, as kind publishes on it
PORTS_FILE = "published.json"  # in the gateway's own directory: what the forwarder bound
FORWARDER_START = 5.0  # seconds for the forwarder to bind its ports


class IngressError(MeshError):
    pass


@dataclass(frozen=True)
class _Secrets:
    """The Secrets read from the control plane, as `controlplane.translate.ingress.certificate` looks them up."""

    by_name: Mapping[tuple[str, str], dict[str, Any]]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.by_name.get((namespace, name)) if kind == "Secret" else None


def ingress_pod(gateway: dict[str, Any], secrets: Mapping[tuple[str, str], dict[str, Any]],
                own: str) -> WaypointPod | None:
    """The pod of one ingress Gateway: its flags and files (`own`: its directory, as the pod sees it); None
    when none of its listeners can be served (its status says why)."""
    gw = translate_ingress.ingress_gateway(gateway)
    args: list[str] = []
    files: list[tuple[str, bytes]] = []
    ports: list[tuple[str, int]] = []
    for li in gw.listeners:
        if li.protocol == "HTTPS":
            cert = translate_ingress.certificate(gw, li, _Secrets(secrets))
            if cert.reason:
                log.warning("ingress %s: %s: the listener is not served", gw.key, cert.problem)
                continue
            files += [(f"{li.name}.crt", cert.chain), (f"{li.name}.key", cert.key)]
            args += ["--listener", f"{li.name}=HTTPS:{li.port}:{own}/{li.name}.crt:{own}/{li.name}.key"]
        else:
            args += ["--listener", f"{li.name}=HTTP:{li.port}"]
        ports.append((li.name, li.port))
    if not ports:
        return None
    digest = hashlib.sha256(json.dumps([args, [(n, d.hex()) for n, d in files]]).encode()).hexdigest()[:16]
    account = ingress_service_account(gw.name)
    return WaypointPod(gw.namespace, gw.name, service_account=account, args=("--service-account", account, *args),
                       labels=((DATAPLANE_MODE_LABEL, "none"),), files=tuple(files), ports=tuple(ports),
                       revision=digest)


class GatewayController(WaypointController):
    """The waypoint pods, and the ingress gateways' pods with their host ports."""

    def wanted(self) -> dict[str, WaypointPod]:
        gateways = self.api.get("Gateway")
        want = desired(gateways)
        ingresses = [g for g in gateways if (g.get("spec") or {}).get("gatewayClassName") == INGRESS_CLASS]
        if ingresses:
            secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in self.api.get("Secret")}
            for gw in ingresses:
                meta = gw["metadata"]
                own = self._dir(WaypointPod(str(meta.get("namespace") or "default"), str(meta["name"])))
                pod = ingress_pod(gw, secrets, str(own))
                if pod is not None:
                    want[pod.key] = pod
        return want

    def _prepare(self, wp: WaypointPod, netns: str) -> None:
        if wp.ports:  # an ingress gateway binds its listeners' ports (80, 443) as its own user
            mnetns.write_sysctl(netns, "net.ipv4.ip_unprivileged_port_start", "0")

    def _started(self, wp: WaypointPod, entry: dict[str, Any]) -> None:
        """An ingress gateway's listeners published on the host's loopback (see the module docstring)."""
        if not wp.ports:
            return
        pod = entry["pod"]
        ports_file = self._dir(wp) / PORTS_FILE
        ports_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "localcluster.hostports", "--netns", node_netns(self.cluster, pod["node"]),
                "--ports-file", str(ports_file)]
        for name, port in wp.ports:
            argv += ["--forward", f"{name}={PUBLISH_HOST}:0={pod['ip']}:{port}"]
        rec = processes.spawn(self.cluster, f"hostports {wp.key}", "", argv, components.component_env({}),
                              self.home / "logs" / f"{wp.namespace}.{wp.name}.hostports.log")
        deadline = time.monotonic() + FORWARDER_START
        while not ports_file.exists():
            if time.monotonic() > deadline or not processes.is_running(rec):
                processes.stop([rec.pid], grace=STOP_GRACE)
                raise IngressError(f"ingress {wp.key}: the host port forwarder did not start: "
                                   f"{processes.tail(rec.log)}")
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        pod["forwarder"] = rec.to_json()
        pod["annotations"] = {PUBLISHED_ANNOTATION: format_published(
            {name: f"{PUBLISH_HOST}:{port}" for name, port in ports.items()})}
        log.info('{"event": "ingress published", "gateway": "%s", "ports": %s}', wp.key, json.dumps(ports))

    def remove(self, key: str) -> None:
        forwarder = (self.running.get(key) or {}).get("pod", {}).get("forwarder")
        try:
            super().remove(key)
        finally:
            if forwarder is not None:
                rec = ProcessRecord.from_json(forwarder)
                if processes.start_time(rec.pid) == rec.start_time:
                    processes.stop([rec.pid], grace=STOP_GRACE)
