"""The mesh's own processes in a local cluster: the control plane and one node agent per node, started
from `daemonset/`'s Deployment and DaemonSet as a kubelet would start their pods.

Each start first decides (pure: `plan_control_plane`, `plan_node_agent`), then does the I/O.  The command,
arguments, environment and readiness probe come from the manifest's container (`localcluster.kubelet`),
with the local cluster's overlay (`localcluster.overlay`: where volumes are here, the flags that differ).
The control plane runs in the underlay namespace on its `.1` address (as a Deployment would run on some
node, reachable from all), with its state under `<cluster dir>/controlplane/`.  `cluster up` waits for it
(its readiness probe and its apply API), registers the cluster's namespaces, service accounts, pods and
services in its store, asks it for each node's token (the control plane alone reads its token key), and
starts each node's agent in the node's namespace with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import kubelet, manifests, overlay, processes
from localcluster.kubelet import ContainerRun, PodFields, Probe
from localcluster.manifests import Manifest
from localcluster.plan import bpf_prefix
from localcluster.processes import ProcessRecord
from localcluster.workloads import probe_ready
from mesh import defaults
from mesh.errors import MeshError
from mesh.files import write_atomic

CONTROLPLANE_GRPC_PORT = defaults.CONTROLPLANE_GRPC_PORT
TRUST_DOMAIN = defaults.TRUST_DOMAIN
CONTROLPLANE_SUBDIR = "controlplane"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTROLPLANE_PROCESS = "controlplane"
CNI_SOCKET_FLAG = "--cni-socket"


class ComponentError(MeshError):
    pass


def component_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", BASE_PATH), "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def controlplane_address(gateway: str) -> str:
    return f"{gateway}:{CONTROLPLANE_GRPC_PORT}"


@dataclass(frozen=True)
class Workloads:
    """The two workloads of the base the local cluster runs."""

    control_plane: Manifest
    node_agent: Manifest


def load_workloads(directory: Path = manifests.DAEMONSET_DIR) -> Workloads:
    base = manifests.load_base(directory)
    cp, agent = (base.find(ref.kind, ref.namespace, ref.name) for ref in (overlay.CONTROL_PLANE, overlay.NODE_AGENT))
    return Workloads(cp, agent)


def nodeagent_process(node: str) -> str:
    return f"nodeagent {node}"


def _run(workload: Manifest, ref: overlay.WorkloadRef, pod: PodFields, ov: overlay.Overlay) -> ContainerRun:
    run = kubelet.container_run(workload, ref.container, pod, ov.mounts, env_overrides=ov.env,
                                executables=ov.executables, skip_init=ov.skip_init)
    return dataclasses.replace(run, argv=tuple(overlay.apply_args(run.argv, ov.args)))


def _pod(workload: Manifest, name: str, node: str, ip: str) -> PodFields:
    spec = workload.pod_spec()  # a clear error, naming the file, when the template is broken
    meta = workload.body["spec"]["template"].get("metadata") or {}
    return PodFields(name=name, namespace=workload.namespace, node=node, ip=ip, host_ip=ip,
                     service_account=str(spec.get("serviceAccountName") or "default"),
                     uid=f"{workload.namespace}.{name}", labels=dict(meta.get("labels") or {}),
                     annotations=dict(meta.get("annotations") or {}))


def plan_control_plane(home: Path, gateway: str, workload: Manifest) -> tuple[PodFields, ContainerRun]:
    """The control plane's pod (in the underlay, on its `.1` address) and what to start for it."""
    pod = _pod(workload, f"{workload.name}-0", "", gateway)
    ov = overlay.control_plane(home, pod.name, controlplane_address(gateway))
    return pod, _run(workload, overlay.CONTROL_PLANE, pod, ov)


def plan_node_agent(cluster_name: str, home: Path, node: str, node_ip: str, gateway: str, workload: Manifest, *,
                    redirect_mode: str, pod_cgroup_format: str = "",
                    extra_args: list[str] | None = None) -> tuple[PodFields, ContainerRun]:
    """A node's agent's pod (in the node's namespace, on its address) and what to start for it."""
    pod = _pod(workload, f"{workload.name}-{node}", node, node_ip)
    ov = overlay.node_agent(home=home, pod=pod.name, node_dir=node_dir(home, node), token=node_token(home, node),
                            root_cert=root_cert(home), control_plane=controlplane_address(gateway),
                            redirect_mode=redirect_mode, pod_cgroup=pod_cgroup_format,
                            bpf_prefix=bpf_prefix(cluster_name), extra_args=extra_args or ())
    return pod, _run(workload, overlay.NODE_AGENT, pod, ov)


def cni_socket(run: ContainerRun) -> str:
    """Where the node agent takes pods from the CNI plugin: its `--cni-socket`, as it will run (the
    DaemonSet's path, rewritten to the node's directory), so that the node's CNI configuration names it."""
    source, path = _flag_value(run.argv, "--pod-source"), _flag_value(run.argv, CNI_SOCKET_FLAG)
    if source != "cni" or not path:
        raise ComponentError(f"the node agent would not take pods from the CNI plugin (--pod-source {source or '?'}"
                             f", {CNI_SOCKET_FLAG} {path or '?'}): the local cluster wires pods with CNI plugins, "
                             f"so it needs --pod-source cni and {CNI_SOCKET_FLAG} PATH, as the DaemonSet gives them")
    return path


def _flag_value(argv: tuple[str, ...], flag: str) -> str:
    """The last value of `flag` (`--flag value` or `--flag=value`), as argparse takes it; "" when absent."""
    value = ""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def wait_cni_socket(path: str, rec: ProcessRecord, timeout: float) -> None:
    """Wait until the node agent accepts on its CNI socket (it opens it once discovery has synced), so
    that the plugin's ADD of the node's first pods finds it, as the DaemonSet's agent is ready before
    a node takes pods."""
    deadline = time.monotonic() + timeout
    while True:
        if not processes.is_running(rec):
            raise ComponentError(f"{rec.name} exited while starting; its log ends with:\n{processes.tail(rec.log)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise ComponentError(f"{rec.name} did not open its CNI socket {path} in {timeout:g}s (it does "
                                 f"once discovery has synced); its log ends with:\n{processes.tail(rec.log)}")
        time.sleep(0.1)


def workload_record(workload: Manifest, ref: overlay.WorkloadRef, pods: list[dict[str, Any]]) -> dict[str, Any]:
    """What the cluster record keeps of a workload it runs: the manifest as run, and its pods."""
    return {"kind": workload.kind, "namespace": workload.namespace, "name": workload.name,
            "container": ref.container, "source": manifests.shown(workload.source), "document": workload.document,
            "manifest": manifests.snapshot(workload), "pods": pods}


@dataclass(frozen=True)
class Started:
    """A workload's pod the local cluster started: the pod, what was started for it, and the process."""

    pod: PodFields
    run: ContainerRun
    process: ProcessRecord

    def pod_record(self) -> dict[str, Any]:
        """What the cluster record keeps of the pod (`localcluster.workloads` reads it)."""
        readiness = self.run.readiness
        return {"name": self.pod.name, "node": self.pod.node, "ip": self.pod.ip, "netns": self.process.netns,
                "process": self.process.name, "readiness": dataclasses.asdict(readiness) if readiness else None}


def _spawn(cluster_name: str, name: str, netns: str, run: ContainerRun, log: Path, host_mounts: bool = False) -> ProcessRecord:
    for directory in run.make_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    return processes.spawn(cluster_name, name, netns, list(run.argv), component_env(dict(run.env)), log,
                           host_mounts=host_mounts)


def run_control_plane(cluster_name: str, home: Path, netns: str, gateway: str, workload: Manifest) -> Started:
    pod, run = plan_control_plane(home, gateway, workload)
    return Started(pod, run, _spawn(cluster_name, CONTROLPLANE_PROCESS, netns, run, home / "logs" / "controlplane.log"))


def start_control_plane(cluster_name: str, home: Path, netns: str, gateway: str, *,
                        workload: Manifest | None = None) -> ProcessRecord:
    """The control plane from the Deployment (`workload`, else the one in daemonset/)."""
    return run_control_plane(cluster_name, home, netns, gateway, workload or load_workloads().control_plane).process


def wait_control_plane(home: Path, rec: ProcessRecord, timeout: float, *, readiness: Probe | None = None,
                       ip: str = "") -> dict[str, Any]:
    """Wait until the control plane has written its endpoints, its readiness probe (the manifest's, when
    given) passes and its apply API answers."""
    from mesh.api.client import ApiClient

    cp = home / CONTROLPLANE_SUBDIR
    deadline = time.monotonic() + timeout
    while True:
        if not processes.is_running(rec):
            raise ComponentError(f"the control plane exited while starting; its log ends with:\n{processes.tail(rec.log)}")
        endpoints = cp / "endpoints.json"
        if endpoints.exists() and (cp / "api.sock").exists() and \
                (readiness is None or probe_ready(readiness, rec.netns, ip)):
            try:
                ApiClient(cp / "api.sock", timeout=2).wait_ready(max(0.5, deadline - time.monotonic()))
                data: dict[str, Any] = json.loads(endpoints.read_text())
                return data
            except (MeshError, ValueError):
                pass
        if time.monotonic() > deadline:
            raise ComponentError(f"the control plane did not become ready in {timeout:.0f}s; its log ends with:\n"
                                 f"{processes.tail(rec.log)}")
        time.sleep(0.1)


def register_objects(home: Path, bodies: list[dict[str, Any]]) -> None:
    from mesh.api.client import register_cluster_objects

    register_cluster_objects(home / CONTROLPLANE_SUBDIR / "api.sock", bodies, source="cluster file")


def update_objects(home: Path, bodies: list[dict[str, Any]], source: str = "kubelet") -> None:
    """Apply objects the control plane already has, changed (pods' status once their sandboxes are wired)."""
    from mesh.api.client import ApiClient
    from mesh.api.validate import Document

    ApiClient(home / CONTROLPLANE_SUBDIR / defaults.API_SOCKET, timeout=10).apply(
        [Document(source, i, body) for i, body in enumerate(bodies, start=1)])


def root_cert(home: Path) -> Path:
    return home / CONTROLPLANE_SUBDIR / "ca" / "root-cert.pem"


def node_dir(home: Path, node: str) -> Path:
    return home / "nodes" / node


def node_token(home: Path, node: str) -> Path:
    return node_dir(home, node) / "token"


def mint_node_token(home: Path, node: str) -> Path:
    """Ask the control plane for the node's token and keep it where its agent reads it."""
    from mesh.api.client import ApiClient

    path = node_token(home, node)
    token = ApiClient(home / CONTROLPLANE_SUBDIR / defaults.API_SOCKET, timeout=10).node_token(node)
    write_atomic(path, token.encode(), mode=0o600)
    return path


def run_node_agent(cluster_name: str, home: Path, node: str, netns: str, gateway: str,
                   extra_args: list[str] | None = None, *, redirect_mode: str = defaults.REDIRECT_MODE,
                   pod_cgroup_format: str = "", node_ip: str = "", workload: Manifest | None = None) -> Started:
    """The node's agent, from the DaemonSet (`workload`, else the one in daemonset/), with a new token."""
    pod, run = plan_node_agent(cluster_name, home, node, node_ip, gateway, workload or load_workloads().node_agent,
                               redirect_mode=redirect_mode, pod_cgroup_format=pod_cgroup_format,
                               extra_args=extra_args)
    mint_node_token(home, node)
    # Only the node's network namespace: the host's mounts stay visible, as the DaemonSet's hostPath volumes
    # give them (cgroup v2, the BPF file system).
    return Started(pod, run, _spawn(cluster_name, nodeagent_process(node), netns, run,
                                    home / "logs" / f"nodeagent.{node}.log", host_mounts=True))


DEFAULT_TERMINATION_GRACE = 30.0  # seconds: Kubernetes' terminationGracePeriodSeconds when a pod gives none


def termination_grace(workload: Manifest) -> float:
    """How long a stopping pod of `workload` may take between SIGTERM and SIGKILL, as a kubelet allows."""
    value = workload.pod_spec().get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE)
    if not isinstance(value, int | float) or value < 0:
        raise ComponentError(f"{workload.where}: terminationGracePeriodSeconds must be a number of seconds, "
                             f"not {value!r}")
    return float(value)


def wait_agent_ready(started: Started, timeout: float) -> bool:
    """Wait until the node agent just `started` passes its readiness probe; False after `timeout`.  Its
    predecessor may still run beside it and share its ports: the probe counts only once this process
    listens on the probe's port, from which moment it takes every new connection to that port
    (`mesh.reuseport.prefer_newest`), so the answer is its own.  Raises if the agent exits."""
    rec, probe = started.process, started.run.readiness
    deadline = time.monotonic() + timeout
    while True:
        if not processes.is_running(rec):
            raise ComponentError(f"{rec.name} exited while starting; its log ends with:\n{processes.tail(rec.log)}")
        if probe is None or (_listens_on(rec.pid, probe.port) and probe_ready(probe, rec.netns, started.pod.ip)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP socket listening on `port` (in its network namespace)."""
    listening = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl local_address rem_address st ... uid timeout inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                listening.add(f"socket:[{fields[9]}]")
    if not listening:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in listening:
                return True
        except OSError:
            continue
    return False


def start_node_agent(cluster_name: str, home: Path, node: str, netns: str, gateway: str,
                     extra_args: list[str] | None = None, *,
                     redirect_mode: str = defaults.REDIRECT_MODE, pod_cgroup_format: str = "",
                     node_ip: str = "", workload: Manifest | None = None) -> ProcessRecord:
    return run_node_agent(cluster_name, home, node, netns, gateway, extra_args,
                          redirect_mode=redirect_mode, pod_cgroup_format=pod_cgroup_format, node_ip=node_ip,
                          workload=workload).process


def start_controller(cluster_name: str, home: Path, agent_args: list[str]) -> ProcessRecord:
    """The local cluster's controller (waypoint pods), in the host's namespace: it makes namespaces."""
    ttl = [a.split("=", 1)[1] for a in agent_args if a.startswith("--cert-ttl=")]
    argv = [sys.executable, "-m", "localcluster.controller", "--cluster", cluster_name,
            *(["--cert-ttl", ttl[-1]] if ttl else [])]
    return processes.spawn(cluster_name, "controller", "", argv,
                           component_env({"MESH_STATE_DIR": str(home.parent)}), home / "logs" / "controller.log")
