"""Waypoint pods of the local cluster: what Istio's deployment controller does on Kubernetes.

For every `Gateway` of class `istio-waypoint` in the control plane's store (except one with `spec.addresses`,
which its user deploys: `manually_deployed`), the cluster runs one pod
named after the gateway in its namespace, with the gateway's name as its service account (so its
identity is `spiffe://<td>/ns/<ns>/sa/<gateway>`) and the label
`gateway.networking.k8s.io/gateway-name=<gateway>`, running `python -m waypoint.main`.  The pod gets an
address from the top of a node's pod CIDR and is registered in the control plane as a Pod, so the
translation points workloads and services at it; then its sandbox is made like every pod's, a network
namespace wired by the node's CNI plugins (`network.create_pod`: the node agent, asked by the chained
plugin, finds it in discovery as a waypoint and leaves it uncaptured), and its process is started.  A
waypoint that goes is stopped, its sandbox deleted with CNI DEL, and it is unregistered.

A waypoint is a mesh component but runs as a pod does (`localcluster.sandbox`): a user of its own
(`WAYPOINT_UID_BASE` onwards, as Istio's waypoint Deployment runs as a non-root user), no capabilities,
the clusters' state hidden, except its own directory `waypoints/<ns>/<name>/` (read-only), which holds
what a Kubernetes pod would find in its projected volumes: its token (kept fresh by the controller,
`localcluster.projected`) and the mesh's trust bundle (copied when it changes: a root rotation).

Readiness, as the kubelet reports it: the pod is registered with its `Ready` condition False, and only when
the waypoint's own readiness endpoint (15021 in its namespace: listening, certificate in hand, first
configuration received) answers 200 does the controller set it True.  Translation sends traffic only to
a Ready waypoint pod, so no node agent dials a waypoint that does not listen yet (that was the
"connection reset" while a waypoint started), and `meshctl waypoint apply --wait` binds a namespace only
then.  A waypoint that goes is first set not Ready, then stopped with SIGTERM: it drains (its listener
closes, GOAWAY, requests in flight finish) for up to its drain time (`spec.infrastructure.annotations`
`DRAIN_ANNOTATION`, default `DEFAULT_DRAIN_SECONDS`, passed as `--drain-seconds`), and is killed only
after that and `STOP_GRACE` more.  Its worker processes (`waypoint.workers`) are `WORKERS_ANNOTATION`,
default 1: the local cluster shares a few cores among all its pods, so one process per waypoint unless asked.
What moves its data path's bytes (`--engine`, `waypoint.engine`) is `ENGINE_ANNOTATION`, default the
waypoint's own (uvloop), so that the two engines can be compared on the same cluster.

A change of the Gateway's infrastructure annotations (a flag of the pod: `--workers`, `--engine`,
`--drain-seconds`), or of an ingress Gateway's revision (its listeners, or a certificate they use), rolls
the pod, as a Deployment rolls when its pod template changes, without dropping a request: the controller
compares what the Gateway asks for (`desired`) with the flags and revision recorded for the running pod
(`roll_reasons`) and, when they differ, starts a new pod beside the old one (`surging`), probes it like
any new pod, and only once it is Ready takes the old one's place: the old one is then retired as a removed
waypoint is (not Ready, SIGTERM, drained).  Both pods run at once, so the new one has its own name, and
with it its own network namespace, address, user, directory, log and registration (the Pod the
translation sees, labelled with the gateway's name like the old one): the gateway's name if it is free,
else the gateway's name with its template's hash (`pod_name_for`, `template_hash`); the pod after a roll
keeps that name.  A roll whose change is undone before its new pod is Ready is abandoned (the new pod is
retired), and a new pod that exits is started again after `RESTART_BACKOFF`.  What a new pod needs as it
takes over is done just before (`_taking_over`: an ingress gateway's host ports are re-targeted to it);
if that fails, the roll stays where it is and the step is tried again.

An ingress Gateway's pod is run the same way, by `localcluster.ingress.GatewayController`, which adds to
this controller what makes it an ingress (`WaypointPod`'s service account, flags, files and published
ports; `_prepare`, `_started` and `_taking_over`).  A pod's flags may name files in its own directory as
`OWN_DIR` (a Kubernetes container's args expand `$(VAR)` the same way), so that a new pod beside the old
one reads its own copy.

`desired`, `place`, `roll_reasons`, `gateway_of` and `pod_name_for` are pure; `WaypointController.sync`
does the I/O, one step per change.  Each change is written to the cluster record and then announced with
`on_change(cluster)`, by default the cluster's Prometheus reloading its scrape configuration
(`localcluster.prometheus.refresh`), so that waypoints are scraped from their first seconds and dropped
when they go.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import components, network, processes, prometheus, sandbox, state
from localcluster.plan import ClusterPlan, PodPlan
from localcluster.processes import ProcessRecord
from localcluster.projected import TokenFile, TokenRefresher, copy_bundle
from localcluster.spec import PodSpec
from mesh import defaults
from mesh.api.client import ApiClient
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.api.validate import Document, Ref
from mesh.errors import MeshError
from mesh.files import write_atomic
from mesh.identity import SpiffeId
from mesh.serve import client
from waypoint.options import ENGINES, Options

log = logging.getLogger("localcluster.waypoints")

WAYPOINT_CLASS = "istio-waypoint"
RESTART_BACKOFF = 5.0  # seconds
TOKEN, ROOT_CERT = "token", "root-cert.pem"  # in a waypoint's own directory
DRAIN_ANNOTATION = "waypoint.ambient.mesh/drain-seconds"  # in the Gateway's spec.infrastructure.annotations
DEFAULT_DRAIN_SECONDS = 5.0  # how long a stopping waypoint lets requests in flight finish
MAX_DRAIN_SECONDS = 300.0
WORKERS_ANNOTATION = "waypoint.ambient.mesh/workers"  # the waypoint's --workers, in the same annotations
MAX_WORKERS = 8  # as the waypoint allows (`waypoint.options.MAX_WORKERS`)
ENGINE_ANNOTATION = "waypoint.ambient.mesh/engine"  # the waypoint's --engine, in the same annotations
DEFAULT_ENGINE = Options.engine  # the waypoint's own default
STOP_GRACE = 2.0  # seconds after the drain time before SIGKILL
PROBE_TIMEOUT = 1.0  # seconds for one readiness probe
PROBE_FAILURES = 3  # failed probes in a row that make a ready waypoint not ready (the kubelet's failureThreshold)
OWN_DIR = "$(OWN_DIR)"  # in `WaypointPod.args`: the pod's own directory (`WaypointController.create`)


def drain_seconds(gateway: dict[str, Any]) -> float:
    """The drain time a waypoint Gateway asks for (`DRAIN_ANNOTATION`), or the default; a value that is
    not a number of seconds from 0 to `MAX_DRAIN_SECONDS` is logged and the default used."""
    annotations = ((gateway.get("spec") or {}).get("infrastructure") or {}).get("annotations") or {}
    raw = annotations.get(DRAIN_ANNOTATION)
    if raw is None:
        return DEFAULT_DRAIN_SECONDS
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value <= MAX_DRAIN_SECONDS:
        meta = gateway.get("metadata") or {}
        log.warning("waypoint %s/%s: %s=%r is not a number of seconds from 0 to %g; draining %gs",
                    meta.get("namespace"), meta.get("name"), DRAIN_ANNOTATION, raw, MAX_DRAIN_SECONDS,
                    DEFAULT_DRAIN_SECONDS)
        return DEFAULT_DRAIN_SECONDS
    return value


def workers(gateway: dict[str, Any]) -> int:
    """The worker processes a waypoint Gateway asks for (`WORKERS_ANNOTATION`), or 1; a value that is not a
    whole number from 1 to `MAX_WORKERS` is logged and 1 used."""
    annotations = ((gateway.get("spec") or {}).get("infrastructure") or {}).get("annotations") or {}
    raw = annotations.get(WORKERS_ANNOTATION)
    if raw is None:
        return 1
    value = int(raw) if str(raw).strip().isdigit() else 0
    if not 1 <= value <= MAX_WORKERS:
        meta = gateway.get("metadata") or {}
        log.warning("waypoint %s/%s: %s %r is not a whole number from 1 to %d; running 1 worker",
                    meta.get("namespace"), meta.get("name"), WORKERS_ANNOTATION, raw, MAX_WORKERS)
        return 1
    return value


def engine(gateway: dict[str, Any]) -> str:
    """The engine a waypoint Gateway asks for (`ENGINE_ANNOTATION`), or the waypoint's default; a value that
    is not one of `waypoint.options.ENGINES` is logged and the default used."""
    annotations = ((gateway.get("spec") or {}).get("infrastructure") or {}).get("annotations") or {}
    raw = annotations.get(ENGINE_ANNOTATION)
    if raw is None:
        return DEFAULT_ENGINE
    if raw not in ENGINES:
        meta = gateway.get("metadata") or {}
        log.warning("waypoint %s/%s: %s %r is not one of %s; running %s",
                    meta.get("namespace"), meta.get("name"), ENGINE_ANNOTATION, raw, ", ".join(ENGINES),
                    DEFAULT_ENGINE)
        return DEFAULT_ENGINE
    return str(raw)


def probed(was_ready: bool, answered: bool, failures: int) -> tuple[bool, int]:
    """(ready, failures in a row) after one readiness probe: Ready at the first success, not Ready after
    `PROBE_FAILURES` failures in a row."""
    failures = 0 if answered else failures + 1
    return answered or (was_ready and failures < PROBE_FAILURES), failures


def ready_condition(ready: bool) -> dict[str, str]:
    return {"type": "Ready", "status": "True" if ready else "False"}


@dataclass(frozen=True)
class WaypointPod:
    namespace: str
    name: str  # the gateway's name: pod name and (by default) service account
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    workers: int = 1  # the waypoint's --workers (`WORKERS_ANNOTATION`)
    engine: str = DEFAULT_ENGINE  # the waypoint's --engine (`ENGINE_ANNOTATION`)
    # what an ingress gateway's pod has besides (`localcluster.ingress`)
    service_account: str = ""  # default: the gateway's name
    args: tuple[str, ...] = ()  # more flags for the proxy (`OWN_DIR` in them: the pod's own directory)
    labels: tuple[tuple[str, str], ...] = ()  # more pod labels
    files: tuple[tuple[str, bytes], ...] = ()  # written (0600) into its own directory before it starts
    ports: tuple[tuple[str, int], ...] = ()  # listener name -> the pod's port, published on the host
    revision: str = ""  # a pod of another revision is rolled (the Gateway's listeners or certificates changed)
    pod_name: str = ""  # the pod's own name (default: the gateway's; a rolled pod's: `pod_name_for`)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def pod(self) -> str:
        return self.pod_name or self.name

    @property
    def account(self) -> str:
        return self.service_account or self.name


def manually_deployed(gateway: dict[str, Any]) -> bool:
    """A Gateway with `spec.addresses` is deployed by its user (Istio's manual deployment): the user runs
    its pods (labelled with the gateway's name, as any waypoint pod), and no pod is made for it here."""
    return bool((gateway.get("spec") or {}).get("addresses"))


def desired(gateways: list[dict[str, Any]]) -> dict[str, WaypointPod]:
    out = {}
    for gw in gateways:
        if (gw.get("spec") or {}).get("gatewayClassName") != WAYPOINT_CLASS or manually_deployed(gw):
            continue
        meta = gw.get("metadata") or {}
        pod = WaypointPod(str(meta.get("namespace") or "default"), str(meta["name"]), drain_seconds(gw),
                          workers=workers(gw), engine=engine(gw))
        out[pod.key] = pod
    return out


def template_hash(wp: WaypointPod) -> str:
    """Five hex digits naming what a pod of the gateway runs with (its flags from the Gateway), as a
    Deployment's pods carry their template's hash."""
    flags = f"{wp.workers}/{wp.engine}/{wp.drain_seconds:g}/{wp.revision}"
    return hashlib.sha256(flags.encode()).hexdigest()[:5]


def roll_reasons(wp: WaypointPod, pod: Mapping[str, Any]) -> list[str]:
    """What differs between the wanted pod and the recorded one's flags from the Gateway (`--workers`,
    `--engine`, `--drain-seconds`) and revision (an ingress Gateway's listeners and certificates), as
    `what old -> new`; empty: the pod runs as wanted.  What the record does not hold (a pod an older
    controller started) is not compared."""
    out = []
    if "workers" in pod and int(pod["workers"]) != wp.workers:
        out.append(f"--workers {pod['workers']} -> {wp.workers}")
    if "engine" in pod and pod["engine"] != wp.engine:
        out.append(f"--engine {pod['engine']} -> {wp.engine}")
    if "drainSeconds" in pod and float(pod["drainSeconds"]) != wp.drain_seconds:
        out.append(f"--drain-seconds {float(pod['drainSeconds']):g} -> {wp.drain_seconds:g}")
    if "revision" in pod and pod["revision"] != wp.revision:
        out.append(f"revision {pod['revision'] or '-'} -> {wp.revision or '-'}")
    return out


def gateway_of(pod: Mapping[str, Any]) -> str:
    """The key (namespace/name) of the Gateway a recorded pod belongs to: its gateway-name label, else its
    own name (a pod an older controller started)."""
    return f"{pod['namespace']}/{(pod.get('labels') or {}).get(GATEWAY_NAME_LABEL) or pod['name']}"


def pod_name_for(wp: WaypointPod, taken: Collection[str]) -> str:
    """The name of a new pod of the gateway: the gateway's, unless a pod of it (the one being rolled)
    still holds that name; then the gateway's with the new template's hash (`template_hash`)."""
    if wp.name not in taken:
        return wp.name
    name, n = f"{wp.name}-{template_hash(wp)}", 1
    while name in taken:
        name, n = f"{wp.name}-{template_hash(wp)}-{n}", n + 1
    return name


def pod_flags(command: Sequence[str]) -> dict[str, str]:
    """The flags of a waypoint pod's command line that come from its Gateway (`--workers`, `--engine`,
    `--drain-seconds`), as given there."""
    return {a: b for a, b in zip(command, command[1:], strict=False)
            if a in ("--workers", "--engine", "--drain-seconds")}


def runs_as_wanted(wp: WaypointPod, command: Sequence[str]) -> bool:
    """Whether a registered pod's command line has the wanted pod's `--workers`, `--engine` and
    `--drain-seconds` (what `meshctl waypoint apply --wait` waits for after a change); a command without
    them is not ours to judge."""
    flags = pod_flags(command)
    return flags.get("--workers", str(wp.workers)) == str(wp.workers) and \
        flags.get("--engine", wp.engine) == wp.engine and \
        flags.get("--drain-seconds", f"{wp.drain_seconds:g}") == f"{wp.drain_seconds:g}"


def place(plan: ClusterPlan, used: dict[str, list[str]]) -> tuple[str, ipaddress.IPv4Address]:
    """A node (the one with the fewest pods) and a free address from the top of its pod CIDR (which
    host-local gives the pod at its ADD)."""
    counts = {n.name: sum(1 for p in plan.pods if p.node == n.name) + len(used.get(n.name, [])) for n in plan.nodes}
    node = min(plan.nodes, key=lambda n: (counts[n.name], n.name))
    taken = {p.ip for p in plan.pods} | {ipaddress.IPv4Address(ip) for ips in used.values() for ip in ips}
    candidate = node.pod_cidr.broadcast_address - 1
    while candidate in taken:
        candidate -= 1
    return node.name, candidate


class WaypointController:
    def __init__(self, cluster: str, plan: ClusterPlan, home: Path, cert_ttl: int = 0, *,
                 proxy_args: Sequence[str] = (),
                 on_change: Callable[[str], object] = prometheus.refresh,
                 tokens: TokenRefresher | None = None) -> None:
        self.cluster = cluster
        self.plan = plan
        self.home = home
        self.proxy_args = list(proxy_args)  # flags every waypoint gets (where it sends spans)
        self.on_change = on_change
        self.cert_ttl = cert_ttl
        self.api = ApiClient(home / components.CONTROLPLANE_SUBDIR / "api.sock", timeout=10)
        self.tokens = tokens if tokens is not None else TokenRefresher(self.api)  # the waypoints' are added
        self.running: dict[str, dict[str, Any]] = {}  # gateway key -> {"pod": {...}, "process": {...}}
        self.surging: dict[str, dict[str, Any]] = {}  # gateway key -> its new pod while it rolls (not Ready yet)

    def adopt(self, key: str, pod: dict[str, Any], process: dict[str, Any]) -> None:
        """A waypoint an earlier controller started (from the cluster record, `key` the pod's): kept, its
        token kept fresh.  A second pod of the same gateway (a roll under way) is kept as its new pod."""
        gw_key = gateway_of(pod)
        gateway = gw_key.split("/", 1)[1]
        entry = {"pod": pod, "process": process}
        (self.surging if gw_key in self.running else self.running)[gw_key] = entry
        uid, gid = int(pod.get("runAsUser", sandbox.NOBODY)), int(pod.get("runAsGroup", sandbox.NOBODY))
        self.tokens.add(self._token_file(WaypointPod(pod["namespace"], gateway, pod_name=pod["name"],
                                                     service_account=pod.get("serviceAccount", "")), (uid, gid)))

    def project(self) -> None:
        """The running waypoints' copy of the trust bundle, made again when it changed (a root rotation)."""
        source = components.root_cert(self.home)
        for entry in self.running.values():
            pod = entry["pod"]
            owner = (int(pod.get("runAsUser", sandbox.NOBODY)), int(pod.get("runAsGroup", sandbox.NOBODY)))
            try:
                copy_bundle(source, self._dir(WaypointPod(pod["namespace"], pod["name"])) / ROOT_CERT, owner)
            except OSError as exc:
                log.warning("could not copy the trust bundle for waypoint %s/%s: %s", pod["namespace"],
                            pod["name"], exc)

    def wanted(self) -> dict[str, WaypointPod]:
        """The pods the Gateways ask for."""
        return desired(self.api.get("Gateway"))

    def sync(self) -> None:
        want = self.wanted()
        for key in [k for k in self.running if k not in want]:
            self.remove(key)
        for key in [k for k in self.surging if k not in self.running or k not in want
                    or not roll_reasons(want[k], self.running[k]["pod"]) or roll_reasons(want[k], self.surging[k]["pod"])]:
            log.info('{"event": "waypoint roll abandoned", "waypoint": "%s"}', key)  # no longer wanted as it is
            self._retire(key, self.surging.pop(key))
        for key, wp in want.items():
            entry = self.running.get(key)
            if entry is not None and processes.is_running(ProcessRecord.from_json(entry["process"])):
                self._probe(key, entry)
                reasons = roll_reasons(wp, entry["pod"])
                if reasons:
                    self._roll(wp, reasons)
                continue
            if entry is not None:
                if time.monotonic() - entry.get("started", 0.0) < RESTART_BACKOFF:
                    continue  # a waypoint that keeps exiting is restarted at most this often
                log.warning("waypoint %s exited; starting it again (its log: %s)", key, entry["process"]["log"])
                self.remove(key)
            self.running[key] = self.create(wp)
            self._save()

    def _roll(self, wp: WaypointPod, reasons: list[str]) -> None:
        """One step of a roll (see the module docstring): start the new pod; probe it; once it is Ready,
        it takes the old one's place and the old one is retired (not Ready, drained, unmade)."""
        new = self.surging.get(wp.key)
        if new is None:
            taken = {e["pod"]["name"] for e in self._entries() if e["pod"]["namespace"] == wp.namespace}
            log.info('{"event": "waypoint rolling", "waypoint": "%s", "changes": "%s"}', wp.key, "; ".join(reasons))
            self.surging[wp.key] = self.create(dataclasses.replace(wp, pod_name=pod_name_for(wp, taken)))
            self._save()
            return
        if not processes.is_running(ProcessRecord.from_json(new["process"])):
            if time.monotonic() - new.get("started", 0.0) >= RESTART_BACKOFF:
                log.warning("waypoint %s: its new pod exited; starting another (its log: %s)", wp.key,
                            new["process"]["log"])
                self._retire(wp.key, self.surging.pop(wp.key))
            return
        self._probe(wp.key, new)
        if new.get("ready"):
            self._taking_over(wp, new)  # raising leaves the roll as it is, for the next round
            old = self.running[wp.key]
            self.running[wp.key] = self.surging.pop(wp.key)
            log.info('{"event": "waypoint rolled", "waypoint": "%s", "pod": "%s", "old pod": "%s"}', wp.key,
                     new["pod"]["name"], old["pod"]["name"])
            self._retire(wp.key, old)

    def _entries(self) -> list[dict[str, Any]]:
        """Every pod the controller runs: the waypoints', and the new pods of those rolling."""
        return [*self.running.values(), *self.surging.values()]

    def create(self, wp: WaypointPod) -> dict[str, Any]:
        """Make the pod `wp` asks for (named `wp.pod`) and start its waypoint; its entry, for the caller
        to keep (and `_save`)."""
        used: dict[str, list[str]] = {}
        for entry in self._entries():
            used.setdefault(entry["pod"]["node"], []).append(entry["pod"]["ip"])
        node_name, ip = place(self.plan, used)
        node = self.plan.node(node_name)
        netns_name = f"{self.plan.prefix}pod.{wp.namespace}.{wp.pod}"
        uid = self._free_uid()
        own = self._provide(wp, (uid, uid))
        argv = self.command(wp, node_name, own)
        spec = PodSpec(name=wp.pod, namespace=wp.namespace, node=node_name,
                       labels={GATEWAY_NAME_LABEL: wp.name, **dict(wp.labels)},
                       service_account=wp.account, container_name="waypoint", command=tuple(argv), env=(),
                       ports=(), working_dir="", document={}, run_as_user=uid, run_as_group=uid)
        pod = PodPlan(name=wp.pod, namespace=wp.namespace, node=node_name, netns=netns_name, ip=ip,
                      gateway=node.gateway, prefixlen=node.pod_cidr.prefixlen, spec=spec)
        self._register(wp, pod)  # first: the plugin's ADD asks the node agent, which looks the pod up
        try:
            network.create_pod(self.home, self.plan, pod)
            self._prepare(wp, netns_name)
            rec = processes.spawn(self.cluster, f"waypoint {wp.namespace}/{wp.pod}", netns_name, argv,
                                  components.component_env({"HOME": "/"}),
                                  self.home / "logs" / f"{wp.namespace}.{wp.pod}.log",
                                  sandbox=sandbox.for_pod(uid, uid, expose=[own]))
        except BaseException:  # nothing half-made stays: the next round starts afresh
            self._unmake(f"{wp.namespace}/{wp.pod}", node_name, netns_name)
            raise
        entry = {"pod": {"name": wp.pod, "namespace": wp.namespace, "node": node_name,
                         "netns": netns_name, "ip": str(ip), "serviceAccount": wp.account,
                         "labels": spec.labels, "runAsUser": uid, "runAsGroup": uid,
                         "expose": [str(own)], "revision": wp.revision,
                         "workers": wp.workers, "engine": wp.engine, "drainSeconds": wp.drain_seconds},
                 "process": rec.to_json(), "started": time.monotonic(), "ready": False}
        try:
            self._started(wp, entry)
        except BaseException:
            processes.stop([rec.pid], grace=STOP_GRACE)
            self._unmake(f"{wp.namespace}/{wp.pod}", node_name, netns_name)
            raise
        log.info('{"event": "waypoint started", "waypoint": "%s", "pod": "%s", "node": "%s", "ip": "%s"}', wp.key,
                 wp.pod, node_name, ip)
        return entry

    def command(self, wp: WaypointPod, node_name: str, own: Path) -> list[str]:
        """The command line of a pod of `wp` on node `node_name` whose own directory is `own`: its flags
        from the Gateway (`--workers`, `--engine`, `--drain-seconds`), what every waypoint gets, and
        `wp.args`."""
        argv = [sys.executable, "-m", "waypoint.main", "--name", wp.name, "--namespace", wp.namespace,
                "--node", node_name, "--control-plane", components.controlplane_address(str(self.plan.underlay_gateway)),
                "--root-cert", str(own / ROOT_CERT), "--token-file", str(own / TOKEN),
                "--trust-domain", components.TRUST_DOMAIN, "--drain-seconds", f"{wp.drain_seconds:g}",
                "--workers", str(wp.workers), "--engine", wp.engine]
        if self.cert_ttl:
            argv += ["--cert-ttl", str(self.cert_ttl)]
        return argv + [arg.replace(OWN_DIR, str(own)) for arg in wp.args] + self.proxy_args

    def _prepare(self, wp: WaypointPod, netns: str) -> None:
        """What the pod's sandbox needs before its process starts (nothing for a waypoint)."""

    def _started(self, wp: WaypointPod, entry: dict[str, Any]) -> None:
        """What follows its start (nothing for a waypoint); raising unmakes the pod.  For a new pod beside
        a running one (a roll), `self.running` still holds the old one."""

    def _taking_over(self, wp: WaypointPod, entry: dict[str, Any]) -> None:
        """What the Ready new pod of a roll gets just before it takes the old one's place (nothing for a
        waypoint); raising leaves the roll as it is."""

    def remove(self, key: str) -> None:
        """Retire the gateway's pod (and a new pod of it, if it was rolling)."""
        entry = self.running.pop(key)
        new = self.surging.pop(key, None)
        if new is not None:
            self._retire(key, new)
        self._retire(key, entry)

    def _retire(self, key: str, entry: dict[str, Any]) -> None:
        """Set the pod not Ready (no new traffic is sent to it), let the waypoint drain, then unmake it."""
        if entry.get("ready"):
            try:
                self._set_ready(entry, False)
            except Exception as exc:  # the control plane may be away; the waypoint drains all the same
                log.warning("could not set waypoint pod %s not ready: %s", key, exc)
        rec = ProcessRecord.from_json(entry["process"])
        if processes.start_time(rec.pid) == rec.start_time:
            processes.stop([rec.pid], grace=float(entry["pod"].get("drainSeconds", DEFAULT_DRAIN_SECONDS)) + STOP_GRACE)
        pod = entry["pod"]
        self._unmake(f"{pod['namespace']}/{pod['name']}", pod["node"], pod["netns"])
        self.tokens.remove(self._dir(WaypointPod(pod["namespace"], pod["name"])) / TOKEN)
        self._save()
        log.info('{"event": "waypoint removed", "waypoint": "%s", "pod": "%s"}', key, pod["name"])

    def _probe(self, key: str, entry: dict[str, Any]) -> None:
        """The kubelet's readiness probe: GET /healthz/ready on the waypoint's 15021, in its namespace; the
        pod's `Ready` condition is written when the answer changes it: Ready at the first success, not
        Ready after `PROBE_FAILURES` failures in a row (a busy waypoint that answers one probe late keeps
        its traffic)."""
        pod = entry["pod"]
        endpoint = client.Endpoint.tcp(pod["ip"], defaults.READINESS_PORT, netns=pod["netns"])
        try:
            answered = client.get(endpoint, "/healthz/ready", timeout=PROBE_TIMEOUT).status == 200
        except (MeshError, OSError):
            answered = False
        ready, entry["failures"] = probed(bool(entry.get("ready")), answered, int(entry.get("failures", 0)))
        if ready != bool(entry.get("ready")):
            self._set_ready(entry, ready)
            entry["ready"] = ready
            log.info('{"event": "waypoint %s", "waypoint": "%s"}', "ready" if ready else "not ready", key)

    def _set_ready(self, entry: dict[str, Any], ready: bool) -> None:
        """Write the registered Pod's `Ready` condition (the rest of it as registered)."""
        pod = entry["pod"]
        body = self.api.get("Pod", pod["namespace"], pod["name"])[0]
        body.setdefault("status", {})["conditions"] = [ready_condition(ready)]
        if pod.get("annotations"):
            body["metadata"]["annotations"] = {**(body["metadata"].get("annotations") or {}), **pod["annotations"]}
        for key in ("resourceVersion", "generation"):
            body["metadata"].pop(key, None)
        self.api.apply([Document("waypoint controller", 1, body)])

    def _unmake(self, key: str, node: str, netns: str) -> None:
        """Delete the pod's sandbox (CNI DEL, then its namespace) and unregister it (`key`: the pod's
        namespace/name); each step is tried."""
        try:
            network.delete_pod(self.home, self.cluster, node, netns)
        except MeshError as exc:  # its namespace is removed all the same
            log.warning("CNI DEL of waypoint pod %s: %s", key, exc)
        ns, name = key.split("/", 1)
        try:
            self.api.delete_refs([str(Ref("Pod", ns, name))], ignore_not_found=True)
        except Exception as exc:  # the control plane may be away; the pod goes anyway
            log.warning("could not unregister waypoint pod %s: %s", key, exc)

    def _dir(self, wp: WaypointPod) -> Path:
        return self.home / "waypoints" / wp.namespace / wp.pod

    def _token_file(self, wp: WaypointPod, owner: tuple[int, int]) -> TokenFile:
        identity = SpiffeId(components.TRUST_DOMAIN, wp.namespace, wp.account)
        return TokenFile(self._dir(wp) / TOKEN, identity=identity.uri, owner=owner)

    def _free_uid(self) -> int:
        """The first waypoint uid no running waypoint has (each waypoint its own: see the module docstring)."""
        taken = {int(e["pod"].get("runAsUser", -1)) for e in self._entries()}
        uid = sandbox.WAYPOINT_UID_BASE
        while uid in taken:
            uid += 1
        return uid

    def _provide(self, wp: WaypointPod, owner: tuple[int, int]) -> Path:
        """The waypoint's own directory, its user's alone: a workload token for its identity, from the
        control plane (kept fresh from now on), and the trust bundle."""
        own = self._dir(wp)
        own.mkdir(parents=True, exist_ok=True)
        os.chown(own, *owner)
        own.chmod(0o700)
        token = self._token_file(wp, owner)
        self.tokens.add(token)
        self.tokens.write(token)
        (own / ROOT_CERT).unlink(missing_ok=True)  # a copy another user of an earlier start owned
        copy_bundle(components.root_cert(self.home), own / ROOT_CERT, owner)
        for name, data in wp.files:
            write_atomic(own / name, data, mode=0o600, owner=owner)
        return own

    def _register(self, wp: WaypointPod, pod: PodPlan) -> None:
        bodies = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": wp.account, "namespace": wp.namespace}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": wp.pod, "namespace": wp.namespace, "labels": dict(pod.spec.labels)},
             "spec": {"nodeName": pod.node, "serviceAccountName": wp.account,
                      "containers": [{"name": "waypoint", "command": list(pod.spec.command)}]},
             "status": {"phase": "Running", "podIP": str(pod.ip),
                        "hostIP": str(self.plan.node(pod.node).underlay_ip),
                        "conditions": [ready_condition(False)]}},  # Ready once its probe answers
        ]
        self.api.apply([Document("waypoint controller", i, b) for i, b in enumerate(bodies, start=1)])

    def _save(self) -> None:
        """Show the waypoint pods in the cluster record, so status, exec, logs and down see them."""
        record = state.read_record(self.cluster)
        static = [p for p in record["processes"] if not p["name"].startswith("waypoint ")]
        record["processes"] = static + [e["process"] for e in self._entries()]
        record["plan"]["pods"] = [p for p in record["plan"]["pods"] if not p.get("waypoint")] + \
            [{**e["pod"], "waypoint": True} for e in self._entries()]
        state.write_record(self.cluster, record)
        try:
            self.on_change(self.cluster)
        except (MeshError, OSError) as exc:  # the waypoint runs either way; it is scraped after the next change
            log.warning("could not reload the scrape configuration after a waypoint change: %s", exc)
