"""`cluster up`, `down` and `status`: carry out a plan, record it, and remove exactly what it made.

`up` validates the file, removes what a crashed earlier run of the same cluster left, records its
intent (phase `building`) before it creates anything, builds the network (underlay, nodes, service rules,
each node's CNI configuration), starts the control plane and the node agents (waiting for each agent's CNI
socket), makes the pods' sandboxes (namespace, then CNI ADD: a pod of the mesh is captured before its
command starts, as on Kubernetes), reports the pods' addresses, starts their commands, waits for their
ports, and only then marks the cluster `ready`.  A failure on the way tears everything down again,
so a cluster is either fully up or not there.  `down` works from the record and, beyond it, from the
cluster's name prefix and process marker, so it also cleans a run that died before it could record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localcluster import components, network, overlay, processes, prometheus, sandbox, state
from localcluster.components import Workloads
from localcluster.manifests import Manifest
from localcluster.plan import (
    ClusterPlan,
    PodPlan,
    bpf_prefix,
    cluster_cgroup,
    cluster_prefix,
    cni_conflist,
    make_plan,
    pod_cgroup,
)
from localcluster.processes import ProcessRecord
from localcluster.registration import cluster_objects, wired_pods
from localcluster.spec import ClusterSpec
from mesh import cgroup as mcgroup
from mesh import netns as mnetns
from mesh.errors import MeshError

BPFFS = Path("/sys/fs/bpf")
log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 30.0
AGENT_READY_TIMEOUT = 60.0  # a restarted agent: discovery, eBPF compilation, every pod enrolled


class ClusterError(MeshError):
    pass


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ClusterError(f"{what} needs root (network namespaces, veths and iptables): run it with sudo or as root")


@dataclass
class Cluster:
    """A cluster being built or torn down, and its record on disk."""

    spec: ClusterSpec
    plan: ClusterPlan
    processes: list[ProcessRecord] = field(default_factory=list)
    phase: str = "building"
    agent_args: list[str] = field(default_factory=list)  # extra node agent flags (tests: short TTLs)
    workloads: list[dict[str, Any]] = field(default_factory=list)  # daemonset/'s workloads as run, with their pods
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def dir(self) -> Path:
        return state.cluster_dir(self.plan.name)

    def save(self) -> None:
        state.write_record(self.plan.name, {
            "name": self.plan.name, "phase": self.phase, "source": str(self.spec.source.resolve()),
            "started": self.started, "prefix": self.plan.prefix, "plan": self.plan.to_record(),
            "processes": [p.to_json() for p in self.processes], "agentArgs": self.agent_args,
            "workloads": self.workloads, "observability": self.spec.observability.to_record(),
        })


def is_up(name: str) -> bool:
    try:
        record = state.read_record(name)
    except MeshError:
        return False
    return record.get("phase") == "ready" and mnetns.exists(record["plan"]["underlay"]["netns"])


def leftovers(name: str) -> bool:
    prefix = cluster_prefix(name)
    return (any(n.startswith(prefix) for n in mnetns.list_named()) or state.cluster_dir(name).exists()
            or bool(processes.marked_pids(name)))


def up(spec: ClusterSpec, ready_timeout: float = DEFAULT_READY_TIMEOUT, say: Any = print,
       agent_args: list[str] | None = None) -> Cluster:
    require_root("cluster up")
    name = spec.name
    if is_up(name):
        raise ClusterError(f"cluster {name!r} is already up: run `meshctl cluster down {name}` first")
    if leftovers(name):
        say(f"removing what an earlier run of cluster {name!r} left behind")
        down(name)
    plan = make_plan(spec)
    agent_args = [*spec.observability.proxy_args(), *(agent_args or [])]  # where agents send spans
    # A bad manifest, or a CNI plugin missing here, is refused before anything is built.
    workloads, cni_sockets = _check_workloads(plan, list(agent_args or []))
    conflists = _node_cni_configs(plan, cni_sockets)
    cluster = Cluster(spec, plan, agent_args=list(agent_args or []))
    cluster.save()
    me = os.getpid()
    try:
        _build(cluster, say, conflists)
        _start_prometheus(cluster, say, ready_timeout)
        _start_mesh(cluster, workloads, ready_timeout)
        _start_pods(cluster)
        _wait_ready(cluster, ready_timeout)
    except BaseException:
        if os.getpid() != me:  # a forked helper (pyroute2 forks without exec) must not clean up for us
            os._exit(1)
        say(f"cluster {name!r} did not come up; removing what was made")
        down(name)
        raise
    cluster.phase = "ready"
    cluster.save()
    return cluster


def _build(cluster: Cluster, say: Any, conflists: dict[str, dict[str, Any]]) -> None:
    plan = cluster.plan
    say(f"building cluster {plan.name!r}: {len(plan.nodes)} nodes, {len(plan.pods)} pods, "
        f"{len(plan.services)} services")
    network.build_underlay(plan)
    for node in plan.nodes:
        network.build_node(plan, node)
    for node in plan.nodes:
        network.install_service_rules(plan, node)
        network.write_cni_config(cluster.dir, node.name, conflists[node.name])  # the node's /etc/cni/net.d


def _start_prometheus(cluster: Cluster, say: Any, timeout: float) -> None:
    """Prometheus in the underlay namespace, scraping what the record names (`localcluster.prometheus`)."""
    obs = cluster.spec.observability
    if not obs.prometheus:
        return
    if not prometheus.installed():
        say("warning: the prometheus server is not installed (make setup installs it): the cluster runs "
            "without it")
        return
    cluster.processes.append(prometheus.start(cluster.dir, state.read_record(cluster.plan.name),
                                              prometheus.Settings.of(obs), timeout))
    cluster.save()


def _check_workloads(plan: ClusterPlan, agent_args: list[str]) -> tuple[Workloads, dict[str, str]]:
    """The control plane Deployment and node agent DaemonSet of daemonset/, each planned once for this
    cluster (pure), so that a manifest the local cluster cannot run fails `up` before it builds; and each
    node agent's CNI socket, which the node's CNI configuration names."""
    workloads = components.load_workloads()
    home = state.cluster_dir(plan.name)
    components.plan_control_plane(home, str(plan.underlay_gateway), workloads.control_plane)
    sockets = {}
    for node in plan.nodes:
        _, run = components.plan_node_agent(plan.name, home, node.name, str(node.underlay_ip),
                                            str(plan.underlay_gateway), workloads.node_agent,
                                            redirect_mode=node.redirect_mode, pod_cgroup_format=_pod_cgroups(plan.name),
                                            extra_args=agent_args)
        sockets[node.name] = components.cni_socket(run)
    return workloads, sockets


def _node_cni_configs(plan: ClusterPlan, cni_sockets: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each node's CNI configuration list (the mesh's plugin talks to that node's agent), once the plugins
    it runs are known to be on this machine."""
    home = state.cluster_dir(plan.name)
    conflists = {node.name: cni_conflist(node, agent_socket=cni_sockets[node.name],
                                         ipam_dir=str(network.ipam_dir(home, node.name)),
                                         cgroup_format=_pod_cgroups(plan.name))
                 for node in plan.nodes}
    for conflist in conflists.values():
        network.require_cni_plugins(plan.name, conflist)
    return conflists


def _start_mesh(cluster: Cluster, workloads: Workloads, timeout: float) -> None:
    """The control plane first (with the cluster's objects registered in it), then the node agents."""
    plan = cluster.plan
    gateway = str(plan.underlay_gateway)
    cp = components.run_control_plane(plan.name, cluster.dir, plan.underlay_netns, gateway, workloads.control_plane)
    cluster.processes.append(cp.process)
    cluster.workloads.append(components.workload_record(workloads.control_plane, overlay.CONTROL_PLANE,
                                                        [cp.pod_record()]))
    cluster.save()
    components.wait_control_plane(cluster.dir, cp.process, timeout, readiness=cp.run.readiness, ip=cp.pod.ip)
    components.register_objects(cluster.dir, cluster_objects(cluster.spec, plan, wired=False))  # no pod IPs yet
    agent_pods: list[dict[str, Any]] = []
    cluster.workloads.append(components.workload_record(workloads.node_agent, overlay.NODE_AGENT, agent_pods))
    agents = []
    for node in plan.nodes:
        agent = _start_agent(plan.name, cluster.dir, node.name, node.netns, gateway, node.redirect_mode,
                             cluster.agent_args, str(node.underlay_ip), workloads.node_agent)
        agents.append(agent)
        cluster.processes.append(agent.process)
        agent_pods.append(agent.pod_record())
        cluster.save()
    for agent in agents:  # the plugin's ADD of a node's pods must find its agent (they start together)
        components.wait_cni_socket(components.cni_socket(agent.run), agent.process, timeout)
    cluster.processes.append(components.start_controller(plan.name, cluster.dir, cluster.agent_args))
    cluster.save()


def _pod_cgroups(cluster: str) -> str:
    return str(mcgroup.v2_root() / pod_cgroup(cluster, "{namespace}", "{name}"))


def _start_agent(cluster: str, home: Path, node: str, netns: str, gateway: str, mode: str,
                 agent_args: list[str], node_ip: str, workload: Manifest | None) -> components.Started:
    return components.run_node_agent(cluster, home, node, netns, gateway, agent_args,
                                       redirect_mode=mode, pod_cgroup_format=_pod_cgroups(cluster),
                                       node_ip=node_ip, workload=workload)


def _recorded(record: dict[str, Any], ref: overlay.WorkloadRef) -> Manifest | None:
    """A workload as the cluster runs it (its record), so a restarted pod is the same pod."""
    for e in record.get("workloads", []):
        if (e["kind"], e["namespace"], e["name"]) == (ref.kind, ref.namespace, ref.name):
            return Manifest(e["manifest"], Path(e["source"]), int(e["document"]))
    return None


def restart_agent(name: str, node: str, redirect_mode: str | None = None,
                  ready_timeout: float = AGENT_READY_TIMEOUT) -> ProcessRecord:
    """Replace the node's agent as the DaemonSet's rolling update does (maxSurge 1, maxUnavailable 0),
    refusing no connection: the new agent (in `redirect_mode`, else the node's mode) starts beside the
    old one and shares its ports, in the pods and on the node (`mesh.reuseport`), adopts the pods'
    capture as it is and takes the CNI socket over; once its readiness probe passes, the old one gets
    SIGTERM and drains (its open connections finish, for up to its `--drain-seconds`) and is killed only
    if it outlives the DaemonSet's terminationGracePeriodSeconds.  A new agent that exits while starting
    leaves the old one running (ClusterError); one that is not ready within `ready_timeout` (an old agent
    that shares no port, from before surges, keeps it from listening in the pods) has the old one
    stopped anyway, and then gets the same time again.  A new capture mode replaces the old mode's once
    the pods are released (label them out of the mesh first to switch cleanly)."""
    require_root("agent restart")
    process = components.nodeagent_process(node)
    started, workload, mode = _start_agent_of(name, state.read_record(name), node, redirect_mode)
    ready = components.wait_agent_ready(started, ready_timeout)
    with state.record_lock(name):  # read again: the controller may have restarted a dead agent meanwhile
        record = state.read_record(name)
        old = [ProcessRecord.from_json(p) for p in record["processes"] if p["name"] == process]
        next(n for n in record["plan"]["nodes"] if n["name"] == node)["redirectMode"] = mode
        record["processes"] = [p for p in record["processes"] if p["name"] != process] + [started.process.to_json()]
        state.write_record(name, record)
    processes.stop([rec.pid for rec in old if processes.start_time(rec.pid) == rec.start_time],
                   grace=components.termination_grace(workload))
    if not ready and not components.wait_agent_ready(started, ready_timeout):
        raise ClusterError(f"the new node agent of {node} is not ready after {2 * ready_timeout:.0f}s; its log "
                           f"ends with:\n{processes.tail(started.process.log)}")
    return started.process


def revive_agent(name: str, node: str) -> ProcessRecord:
    """Start the node's agent again after it exited, as a kubelet restarts a DaemonSet pod's container
    (`localcluster.supervision` decides when): the same start as `cluster up` and `agent restart` (the
    recorded manifest, flags and capture mode, a new token), with no old agent to hand over from; the new
    one adopts the pods' capture, which outlived the old one.  The caller records the new process."""
    started, _, _ = _start_agent_of(name, state.read_record(name), node, None)
    return started.process


def _start_agent_of(name: str, record: dict[str, Any], node: str,
                    redirect_mode: str | None) -> tuple[components.Started, Manifest, str]:
    """Start `node`'s agent as the record says it runs: (what was started, its manifest, its capture mode)."""
    nodes = {n["name"]: n for n in record["plan"]["nodes"]}
    if node not in nodes:
        raise ClusterError(f"cluster {name!r} has no node {node!r} (nodes: {', '.join(sorted(nodes))})")
    workload = _recorded(record, overlay.NODE_AGENT) or components.load_workloads().node_agent
    mode = redirect_mode or nodes[node].get("redirectMode") or "iptables"
    started = _start_agent(name, state.cluster_dir(name), node, nodes[node]["netns"],
                           record["plan"]["underlay"]["gateway"], mode, list(record.get("agentArgs", [])),
                           nodes[node]["ip"], workload)
    return started, workload, mode


def pod_env(plan: ClusterPlan, pod: PodPlan) -> dict[str, str]:
    env = components.component_env({
        "HOSTNAME": pod.name, "POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "POD_IP": str(pod.ip),
        "NODE_NAME": pod.node, "SERVICE_ACCOUNT": pod.spec.service_account,
        "HOME": "/",  # as a runtime sets it for a user without a home; the pod does not run as root
        "PATH": components.BASE_PATH,  # an image's PATH, not the host user's (whose tools it may not reach)
    })
    env.update(dict(pod.spec.env))
    return env


def _start_pods(cluster: Cluster) -> None:
    """As a kubelet: each pod's sandbox first (its cgroup, then its namespace wired by CNI: the agent of its
    node has enrolled it when its ADD returns, if it is in the mesh), then the pods' addresses reported to
    the control plane, then their commands."""
    for pod in cluster.plan.pods:
        mcgroup.create(mcgroup.v2_root() / pod.cgroup)  # before the ADD: the plugin finds it (eBPF capture)
        network.create_pod(cluster.dir, cluster.plan, pod)
    components.update_objects(cluster.dir, wired_pods(cluster.spec, cluster.plan))
    base = cluster.spec.source.resolve().parent
    for pod in cluster.plan.pods:
        cwd = base / pod.spec.working_dir if pod.spec.working_dir else base
        if not cwd.is_dir():
            raise ClusterError(f"pod {pod.key}: working directory {cwd} does not exist")
        rec = processes.spawn(cluster.plan.name, f"pod {pod.key}", pod.netns, list(pod.spec.command),
                              pod_env(cluster.plan, pod), cluster.dir / "logs" / f"{pod.namespace}.{pod.name}.log",
                              cwd=str(cwd), cgroup=mcgroup.v2_root() / pod.cgroup,
                              sandbox=sandbox.for_pod(pod.spec.run_as_user, pod.spec.run_as_group))
        cluster.processes.append(rec)
        cluster.save()


def _port_open(pod: PodPlan, port: int) -> bool:
    with mnetns.entered(pod.netns), socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((str(pod.ip), port)) == 0


def _wait_ready(cluster: Cluster, timeout: float) -> None:
    """Wait until every pod's TCP container ports accept connections; fail early if a pod exits."""
    by_pod = {rec.name: rec for rec in cluster.processes}
    waiting = [(pod, cp.container_port) for pod in cluster.plan.pods for cp in pod.spec.ports if cp.protocol == "TCP"]
    deadline = time.monotonic() + timeout
    while waiting:
        for pod, port in list(waiting):
            rec = by_pod[f"pod {pod.key}"]
            if not processes.is_running(rec):
                raise ClusterError(f"pod {pod.key} exited while starting; its log ends with:\n"
                                   f"{processes.tail(rec.log)}")
            if _port_open(pod, port):
                waiting.remove((pod, port))
        if not waiting:
            return
        if time.monotonic() > deadline:
            pod, port = waiting[0]
            raise ClusterError(f"pod {pod.key} is not listening on port {port} after {timeout:.0f}s; its log "
                               f"ends with:\n{processes.tail(by_pod[f'pod {pod.key}'].log)}")
        time.sleep(0.1)


def down(name: str) -> list[str]:
    """Remove everything of cluster `name`: processes, namespaces (and with them links and rules),
    /etc/netns entries and the state directory.  Returns a summary of what was removed."""
    require_root("cluster down")
    removed: list[str] = []
    try:
        record = state.read_record(name)
    except MeshError:
        record = {}
    # The controller first: it makes waypoint pods, and must not make one while the rest goes.
    controllers = [ProcessRecord.from_json(p) for p in record.get("processes", []) if p["name"] == "controller"]
    processes.stop([c.pid for c in controllers if processes.start_time(c.pid) == c.start_time])
    pids: set[int] = set(processes.marked_pids(name))
    for data in record.get("processes", []):
        rec = ProcessRecord.from_json(data)
        if processes.start_time(rec.pid) == rec.start_time:
            pids.add(rec.pid)
    prefix = cluster_prefix(name)
    for ns_name in mnetns.list_named():
        if ns_name.startswith(prefix):
            pids.update(processes.netns_pids(ns_name))
    if pids:
        processes.stop(pids)
        removed.append(f"{len(pids)} processes")
    deleted = network.remove_cni(state.cluster_dir(name), name)  # as a kubelet tears a sandbox down: CNI DEL
    if deleted:
        removed.append(f"{deleted} pod interfaces (CNI DEL)")
    gone = network.remove_all(prefix)
    if gone:
        removed.append(f"{len(gone)} network namespaces")
    with contextlib.suppress(mcgroup.CgroupError):
        if mcgroup.remove_tree(mcgroup.v2_root() / cluster_cgroup(name)):
            removed.append("pod cgroups")
    pins = BPFFS / bpf_prefix(name)
    if pins.is_dir():  # eBPF capture outlives the agents by design; the cluster's end is its end
        shutil.rmtree(pins, ignore_errors=True)
        removed.append(f"pinned eBPF programs {pins}")
    directory = state.cluster_dir(name)
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"state directory {directory}")
    return removed


def status(name: str) -> dict[str, Any]:
    """The record of a cluster with each pod's and process's liveness filled in."""
    record = state.read_record(name)
    alive = {}
    for data in record.get("processes", []):
        rec = ProcessRecord.from_json(data)
        alive[rec.name] = processes.is_running(rec)
        data["running"] = alive[rec.name]
    for pod in record["plan"]["pods"]:
        kind = "waypoint" if pod.get("waypoint") else "pod"
        pod["running"] = alive.get(f"{kind} {pod['namespace']}/{pod['name']}", False)
        pod["netnsPresent"] = mnetns.exists(pod["netns"])
    for node in record["plan"]["nodes"]:
        node["netnsPresent"] = mnetns.exists(node["netns"])
    if prometheus.PROCESS in alive:
        where = prometheus.endpoint(record)
        record["prometheus"] = {"url": f"http://{where.host}:{where.port}", "netns": where.netns,
                                "running": alive[prometheus.PROCESS], "config": str(
                                    prometheus.directory(state.cluster_dir(name)) / prometheus.CONFIG_FILE)}
    return record


def find_pod(name: str, namespace: str, pod: str) -> dict[str, Any]:
    record = state.read_record(name)
    for p in record["plan"]["pods"]:
        if p["namespace"] == namespace and p["name"] == pod:
            return dict(p)
    have = ", ".join(p["name"] for p in record["plan"]["pods"] if p["namespace"] == namespace) or "none"
    raise ClusterError(f"pod {namespace}/{pod} does not exist in cluster {name!r} "
                       f"(pods in namespace {namespace!r}: {have})")


def pod_log(name: str, namespace: str, pod: str) -> Path:
    find_pod(name, namespace, pod)
    return state.cluster_dir(name) / "logs" / f"{namespace}.{pod}.log"
