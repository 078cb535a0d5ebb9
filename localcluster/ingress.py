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
  in the host's namespace, dialling the pod from its node's namespace: no rule in the host's iptables),
  each on a free port; the forwarder's ports go into the pod's annotation `ingress.ambient.mesh/published`
  when it is set Ready, from which the control plane writes the Gateway's `status.addresses` and listener
  status (`controlplane.translate.ingressstatus`).
The forwarder belongs to the gateway, not to a pod, as a LoadBalancer Service's address outlives the pods
behind it: one process per gateway, its files in `hostports/<ns>/<gateway>/` of the cluster's directory
(`CONFIG_FILE`, what the controller asks; `PORTS_FILE`, what the forwarder bound).  A change of the
Gateway's listeners or of a certificate it uses (a new revision) rolls the pod as a waypoint's flags do
(`localcluster.waypoints`): the new pod starts beside the old one, with its own copy of the files, and
once it is Ready the forwarder is re-targeted to it (the controller writes the configuration, then
SIGHUP), keeping its ports, before the old pod is retired; connections already relayed to the old pod
finish there as it drains.  The new pod's annotation carries the same ports.  A pod that exits is
started again behind the same ports; a forwarder that exits is started again (on new ports: nothing
holds the old ones); the forwarder stops when its Gateway goes.  A controller started again adopts each
forwarder from the pod record that carries it (`forwarder`) and re-targets it to the gateway's pod on
its first round, which changes nothing when it already does.  An HTTPS listener whose Secret is missing
or unusable is left out of the pod (its status says why), and a Gateway with no listener left gets no pod.

`ingress_pod` and `forwards` are pure; `GatewayController` does the I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.translate import ingress as translate_ingress
from controlplane.translate.ingressstatus import PUBLISHED_ANNOTATION, format_published
from localcluster import components, processes
from localcluster.hostports import Forward, format_config
from localcluster.plan import node_netns
from localcluster.processes import ProcessRecord
from localcluster.waypoints import (
    OWN_DIR,
    STOP_GRACE,
    WaypointController,
    WaypointPod,
    desired,
    drain_seconds,
    gateway_of,
)
from mesh import netns as mnetns
from mesh.api.kinds_gateway import DATAPLANE_MODE_LABEL, INGRESS_CLASS, ingress_service_account
from mesh.errors import MeshError
from mesh.files import write_atomic

log = logging.getLogger("localcluster.ingress")

PUBLISH_HOST = "127.0.0.1"  # the host's loopback, as kind publishes on it
HOSTPORTS_DIR = "hostports"  # in the cluster's directory: <ns>/<gateway>/ holds a gateway's forwarder files
CONFIG_FILE = "config.json"  # where the forwarder sends (`localcluster.hostports.format_config`)
PORTS_FILE = "ports.json"  # what the forwarder bound
FORWARDER_START = 5.0  # seconds for the forwarder to bind its ports, or to take a new configuration


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
    """The pod of one ingress Gateway: its flags and files (`own`: its directory, as the pod sees it; the
    controller gives `OWN_DIR`); None when none of its listeners can be served (its status says why)."""
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
    return WaypointPod(gw.namespace, gw.name, drain_seconds(gateway), service_account=account,
                       args=("--service-account", account, *args), labels=((DATAPLANE_MODE_LABEL, "none"),),
                       files=tuple(files), ports=tuple(ports), revision=digest,
                       engine="trio")  # (gateway mode runs on trio whatever the flag: the command line says so)


def forwards(listeners: Mapping[str, int], ip: str) -> list[Forward]:
    """What a gateway's forwarder publishes for its pod at `ip` (listener name -> the pod's port): each
    listener on a free port of the host's loopback, or the port it already has (`hostports.retarget`)."""
    return [Forward(name, PUBLISH_HOST, 0, ip, port) for name, port in listeners.items()]


class GatewayController(WaypointController):
    """The waypoint pods, and the ingress gateways' pods with their host ports."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forwarders: dict[str, dict[str, Any]] = {}  # gateway key -> its forwarder's process record
        self.targets: dict[str, str] = {}  # gateway key -> the pod its forwarder sends to (as this controller set it)

    def wanted(self) -> dict[str, WaypointPod]:
        gateways = self.api.get("Gateway")
        want = desired(gateways)
        ingresses = [g for g in gateways if (g.get("spec") or {}).get("gatewayClassName") == INGRESS_CLASS]
        if ingresses:
            secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in self.api.get("Secret")}
            for gw in ingresses:
                pod = ingress_pod(gw, secrets, OWN_DIR)
                if pod is not None:
                    want[pod.key] = pod
        return want

    def adopt(self, key: str, pod: dict[str, Any], process: dict[str, Any]) -> None:
        super().adopt(key, pod, process)
        if pod.get("forwarder"):
            self.forwarders[gateway_of(pod)] = pod["forwarder"]

    def sync(self) -> None:
        super().sync()
        for key in [k for k in self.forwarders if k not in self.running]:  # its gateway is gone
            self._unpublish(key)
        changed = False
        for key, entry in self.running.items():  # each forwarder running and sending to its gateway's pod
            known = self.forwarders.get(key)
            if entry["pod"].get("listeners") and (self.targets.get(key) != entry["pod"]["name"] or known is None
                                                  or not processes.is_running(ProcessRecord.from_json(known))):
                self._publish(key, entry)
                changed = True
        if changed:
            self._save()

    def _prepare(self, wp: WaypointPod, netns: str) -> None:
        if wp.ports:  # an ingress gateway binds its listeners' ports (80, 443) as its own user
            mnetns.write_sysctl(netns, "net.ipv4.ip_unprivileged_port_start", "0")

    def _started(self, wp: WaypointPod, entry: dict[str, Any]) -> None:
        """An ingress gateway's listeners published on the host's loopback (see the module docstring); a new
        pod beside the running one (a roll) is published as it takes over (`_taking_over`)."""
        if not wp.ports:
            return
        entry["pod"]["listeners"] = dict(wp.ports)
        if wp.key not in self.running:
            self._publish(wp.key, entry)

    def _taking_over(self, wp: WaypointPod, entry: dict[str, Any]) -> None:
        """The gateway's forwarder re-targeted to the new pod of a roll, before the old one is retired."""
        if entry["pod"].get("listeners"):
            self._publish(wp.key, entry)

    def _publish(self, key: str, entry: dict[str, Any]) -> None:
        """Send the gateway's host ports to the pod of `entry`: its forwarder re-targeted, its ports kept, or
        one started if it has none running.  The ports go into the pod's annotation, written now if the pod
        is Ready (else when it turns Ready).  Raises `IngressError` when the forwarder does not answer in
        `FORWARDER_START`; a forwarder it started is then stopped."""
        pod = entry["pod"]
        files = self.home / HOSTPORTS_DIR / key
        config, ports_file = files / CONFIG_FILE, files / PORTS_FILE
        netns = node_netns(self.cluster, pod["node"])
        write_atomic(config, format_config(netns, forwards(pod["listeners"], pod["ip"])))
        ports_file.unlink(missing_ok=True)  # the forwarder writes it once it forwards as asked
        known = self.forwarders.get(key)
        rec = ProcessRecord.from_json(known) if known is not None else None
        started = rec is None or not processes.is_running(rec)
        if rec is not None and not started:
            os.kill(rec.pid, signal.SIGHUP)
        else:
            ns, name = key.split("/", 1)
            argv = [sys.executable, "-m", "localcluster.hostports", "--config", str(config),
                    "--ports-file", str(ports_file)]
            rec = processes.spawn(self.cluster, f"hostports {key}", "", argv, components.component_env({}),
                                  self.home / "logs" / f"{ns}.{name}.hostports.log")
            self.forwarders[key] = rec.to_json()
        deadline = time.monotonic() + FORWARDER_START
        while not ports_file.exists():
            if time.monotonic() > deadline or not processes.is_running(rec):
                if started:
                    processes.stop([rec.pid], grace=STOP_GRACE)
                    self.forwarders.pop(key, None)
                did = "start" if started else f"send to pod {pod['name']}"
                raise IngressError(f"ingress {key}: the host port forwarder did not {did} in {FORWARDER_START:g}s "
                                   f"(its log: {rec.log}): {processes.tail(rec.log)}")
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        self.targets[key] = pod["name"]
        pod["forwarder"] = rec.to_json()
        pod["annotations"] = {PUBLISHED_ANNOTATION: format_published(
            {name: f"{PUBLISH_HOST}:{port}" for name, port in ports.items()})}
        if entry.get("ready"):
            self._set_ready(entry, True)
        log.info('{"event": "%s", "gateway": "%s", "pod": "%s", "ports": %s}',
                 "ingress published" if started else "ingress re-targeted", key, pod["name"], json.dumps(ports))

    def _unpublish(self, key: str) -> None:
        """Stop the gateway's forwarder: its host ports close."""
        rec = ProcessRecord.from_json(self.forwarders.pop(key))
        self.targets.pop(key, None)
        if processes.start_time(rec.pid) == rec.start_time:
            processes.stop([rec.pid], grace=STOP_GRACE)
        log.info('{"event": "ingress unpublished", "gateway": "%s"}', key)
