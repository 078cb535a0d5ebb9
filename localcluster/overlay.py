"""The local cluster's overlay on `daemonset/`: which workloads it runs, where their volumes are on this
machine, and the few flags that differ from Kubernetes.  The one place where the local cluster departs from
the manifests; everything else (command, args, env, probes) is taken from them as a kubelet would
(`localcluster.kubelet`).

Volumes (the kubelet's part: a container path is rewritten to the place below, docs/ARCHITECTURE.md):

    workload            volume (source)                  mounted at                local cluster
    Deployment istiod   state (emptyDir)                 /var/lib/ambient-mesh     <cluster dir>
    DaemonSet agent     ambient-dir (hostPath)           /var/run/ambient          <cluster dir>/nodes/<node>
                        istio-token (projected token)    /var/run/secrets/tokens   istio-token -> <cluster dir>/nodes/<node>/token
                        istiod-ca-cert (ConfigMap        /var/run/secrets/istio    root-cert.pem ->
                          istio-ca-root-cert)                                        <cluster dir>/controlplane/ca/root-cert.pem
    any                 other hostPath                   -                         the host's own path
    any                 other emptyDir                   -                         <cluster dir>/pods/<pod>/<volume>

Executables: the image's `python` is this virtual environment's interpreter.

Flags and variables the local cluster sets (applied after the kubelet's rewriting, so their values are
the host's):

    control plane   --config-source local          the configuration is the local store, written through
                                                   the apply API (`meshctl apply`, `cluster up`); there is no
                                                   Kubernetes API
                    --serving-host <underlay .1>    agents dial that address (no cluster DNS name resolves in
                                                   the nodes' namespaces), so the certificate must carry it
    node agent      --control-plane <underlay .1>:15012   the same reason
                    --pod-cgroup FORMAT            where a pod's cgroup is (the local cluster makes one per
                                                   pod), for pods found by a scan rather than handed over
                    --bpf-prefix amb-<cluster>     eBPF pins per cluster, so clusters never share them
                    REDIRECT_MODE=<node's mode>    per node (the cluster file, `cluster up --redirect-mode`,
                                                   `meshctl agent restart --redirect-mode`)
                    init container install-cni     not run: the local cluster writes each node's network
                                                   configuration itself, with the plugin chained
                                                   (`plan.cni_conflist`), and runs the plugin from the tree

The agents keep the manifest's `--pod-source cni --cni-socket /var/run/ambient/cni.sock` (the socket is in
`<cluster dir>/nodes/<node>/`): pods are handed to them by the CNI plugin, as on Kubernetes.

then the `--agent-arg` extras of `cluster up`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from localcluster.kubelet import HostDir, HostFiles, Mounts, Place


@dataclass(frozen=True)
class WorkloadRef:
    """A workload of the base the local cluster runs, and the container of it that it starts."""

    kind: str
    namespace: str
    name: str
    container: str


CONTROL_PLANE = WorkloadRef("Deployment", "istio-system", "istiod", "discovery")
NODE_AGENT = WorkloadRef("DaemonSet", "istio-system", "ambient-nodeagent", "nodeagent")
WORKLOADS = (CONTROL_PLANE, NODE_AGENT)

EXECUTABLES = {"python": sys.executable}

# Init containers the local cluster does not run, and why.
SKIPPED_INIT_CONTAINERS = {
    "install-cni": "it installs the CNI plugin into the host's /opt/cni/bin and /etc/cni/net.d; the local "
                   "cluster writes each node's network configuration with the plugin chained, and runs it "
                   "from the source tree",
}


@dataclass(frozen=True)
class ArgEdit:
    """`set`: replace the value of every `flag` (append `flag value` when there is none); `add`: append
    `flag value`; `extra`: append `flag` alone (an argument given as is)."""

    op: Literal["set", "add", "extra"]
    flag: str
    value: str = ""


@dataclass(frozen=True)
class Overlay:
    mounts: Mounts
    args: tuple[ArgEdit, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    skip_init: Mapping[str, str] = field(default_factory=lambda: dict(SKIPPED_INIT_CONTAINERS))
    executables: Mapping[str, str] = field(default_factory=lambda: dict(EXECUTABLES))


def pod_dir(home: Path, pod: str) -> Path:
    return home / "pods" / pod


def control_plane(home: Path, pod: str, address: str) -> Overlay:
    """The control plane's overlay: its state in the cluster directory, local configuration, and a
    certificate for `address` (HOST:PORT of its gRPC port, as the agents dial it)."""
    volumes: dict[str, Place] = {"state": HostDir(home)}
    return Overlay(Mounts(volumes, pod_dir(home, pod)), args=(
        ArgEdit("set", "--config-source", "local"),
        ArgEdit("add", "--serving-host", address.rsplit(":", 1)[0]),
    ))


def node_agent(*, home: Path, pod: str, node_dir: Path, token: Path, root_cert: Path, control_plane: str,
               redirect_mode: str, pod_cgroup: str, bpf_prefix: str, extra_args: Sequence[str] = ()) -> Overlay:
    """A node's agent's overlay: its node's directory for the host's /var/run/ambient (where its CNI socket
    is), the node token and the root certificate for the projected volumes, the node's capture mode."""
    volumes: dict[str, Place] = {
        "ambient-dir": HostDir(node_dir, create=True),
        "istio-token": HostFiles({"istio-token": token}),
        "istiod-ca-cert": HostFiles({"root-cert.pem": root_cert}),
    }
    args = [ArgEdit("set", "--control-plane", control_plane),
            ArgEdit("set", "--bpf-prefix", bpf_prefix)]
    if pod_cgroup:
        args.append(ArgEdit("set", "--pod-cgroup", pod_cgroup))
    args += [ArgEdit("extra", a) for a in extra_args]
    return Overlay(Mounts(volumes, pod_dir(home, pod)), args=tuple(args), env={"REDIRECT_MODE": redirect_mode})


def apply_args(argv: Sequence[str], edits: Sequence[ArgEdit]) -> list[str]:
    """The command line with the overlay's edits; `extra` arguments go last, as given."""
    out = list(argv)
    for edit in edits:
        if edit.op == "set":
            positions = [i for i, a in enumerate(out) if a == edit.flag and i + 1 < len(out)]
            for i in positions:
                out[i + 1] = edit.value
            out = [f"{edit.flag}={edit.value}" if a.startswith(edit.flag + "=") else a for a in out]
            if not positions and not any(a.startswith(edit.flag + "=") for a in out):
                out += [edit.flag, edit.value]
        elif edit.op == "add":
            out += [edit.flag, edit.value]
        else:
            out.append(edit.flag)
    return out
