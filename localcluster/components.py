"""The mesh's own processes in a local cluster: the control plane and one node agent per node.

The control plane runs in the underlay namespace on its `.1` address (as a Deployment would run on some
node, reachable from all), with its state under `<cluster dir>/controlplane/`.  `cluster up` waits for it,
registers the cluster's namespaces, service accounts, pods and services in its store, asks it for each
node's token (the control plane alone reads its token key), and starts each node's agent in the node's
namespace with it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from localcluster import processes
from localcluster.plan import bpf_prefix
from localcluster.processes import ProcessRecord
from mesh import defaults
from mesh.errors import MeshError
from mesh.files import write_atomic

CONTROLPLANE_GRPC_PORT = defaults.CONTROLPLANE_GRPC_PORT
CONTROLPLANE_METRICS_PORT = defaults.CONTROLPLANE_METRICS_PORT
TRUST_DOMAIN = defaults.TRUST_DOMAIN
CONTROLPLANE_SUBDIR = "controlplane"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ComponentError(MeshError):
    pass


def component_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", BASE_PATH), "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def controlplane_address(gateway: str) -> str:
    return f"{gateway}:{CONTROLPLANE_GRPC_PORT}"


def start_control_plane(cluster_name: str, home: Path, netns: str, gateway: str) -> ProcessRecord:
    argv = [sys.executable, "-m", "controlplane.main", "--state-dir", str(home),
            "--grpc-listen", controlplane_address(gateway),
            "--metrics-listen", f"{gateway}:{CONTROLPLANE_METRICS_PORT}",
            "--serving-host", gateway, "--trust-domain", TRUST_DOMAIN]
    return processes.spawn(cluster_name, "controlplane", netns, argv, component_env(),
                           home / "logs" / "controlplane.log")


def wait_control_plane(home: Path, rec: ProcessRecord, timeout: float) -> dict[str, Any]:
    """Wait until the control plane has written its endpoints and its apply API answers."""
    from mesh.api.client import ApiClient

    cp = home / CONTROLPLANE_SUBDIR
    deadline = time.monotonic() + timeout
    while True:
        if not processes.is_running(rec):
            raise ComponentError(f"the control plane exited while starting; its log ends with:\n{processes.tail(rec.log)}")
        endpoints = cp / "endpoints.json"
        if endpoints.exists() and (cp / "api.sock").exists():
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


def root_cert(home: Path) -> Path:
    return home / CONTROLPLANE_SUBDIR / "ca" / "root-cert.pem"


def mint_node_token(home: Path, node: str) -> Path:
    """Ask the control plane for the node's token and keep it where its agent reads it."""
    from mesh.api.client import ApiClient

    path = home / "nodes" / node / "token"
    token = ApiClient(home / CONTROLPLANE_SUBDIR / defaults.API_SOCKET, timeout=10).node_token(node)
    write_atomic(path, token.encode(), mode=0o600)
    return path


def start_node_agent(cluster_name: str, home: Path, node: str, netns: str, gateway: str,
                     pod_netns_format: str, extra_args: list[str] | None = None, *,
                     redirect_mode: str = defaults.REDIRECT_MODE, pod_cgroup_format: str = "") -> ProcessRecord:
    token = mint_node_token(home, node)
    argv = [sys.executable, "-m", "nodeagent.main", "--node", node,
            "--control-plane", controlplane_address(gateway), "--root-cert", str(root_cert(home)),
            "--token-file", str(token), "--trust-domain", TRUST_DOMAIN,
            "--pod-netns", pod_netns_format, "--state-dir", str(home / "nodes" / node),
            "--redirect-mode", redirect_mode, "--bpf-prefix", bpf_prefix(cluster_name),
            *(["--pod-cgroup", pod_cgroup_format] if pod_cgroup_format else []),
            *(extra_args or [])]
    return processes.spawn(cluster_name, f"nodeagent {node}", netns, argv, component_env(),
                           home / "logs" / f"nodeagent.{node}.log", host_mounts=True)


def start_controller(cluster_name: str, home: Path, agent_args: list[str]) -> ProcessRecord:
    """The local cluster's controller (waypoint pods), in the host's namespace: it makes namespaces."""
    ttl = [a.split("=", 1)[1] for a in agent_args if a.startswith("--cert-ttl=")]
    argv = [sys.executable, "-m", "localcluster.controller", "--cluster", cluster_name,
            *(["--cert-ttl", ttl[-1]] if ttl else [])]
    return processes.spawn(cluster_name, "controller", "", argv,
                           component_env({"MESH_STATE_DIR": str(home.parent)}), home / "logs" / "controller.log")
