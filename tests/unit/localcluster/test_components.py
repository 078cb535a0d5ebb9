"""The local cluster's control plane and node agents come from daemonset/'s Deployment and DaemonSet: one
agent per node with its node's name and capture mode, command lines that the processes' own parsers
accept, and the overlay's flags last."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import controlplane.main
import nodeagent.main
from localcluster import components, overlay, processes
from localcluster.manifests import DAEMONSET_DIR, ManifestError
from localcluster.overlay import ArgEdit, apply_args
from localcluster.processes import ProcessRecord

GATEWAY = "172.30.0.1"
NODES = {"node-1": ("172.30.0.10", "iptables"), "node-2": ("172.30.0.11", "ebpf")}
POD_CGROUP = "/sys/fs/cgroup/unified/amb.c1/pod.{namespace}.{name}"


def flag(argv: tuple[str, ...] | list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A cluster directory with the files the agents' flags name (the parsers check they exist)."""
    components.root_cert(tmp_path).parent.mkdir(parents=True)
    components.root_cert(tmp_path).write_text("root")
    for node in NODES:
        components.node_token(tmp_path, node).parent.mkdir(parents=True)
        components.node_token(tmp_path, node).write_text("token")
    return tmp_path


def agents(home: Path, extra: list[str] | None = None, directory: Path = DAEMONSET_DIR) -> dict:
    workload = components.load_workloads(directory).node_agent
    return {node: components.plan_node_agent("c1", home, node, ip, GATEWAY, workload, redirect_mode=mode,
                                             pod_cgroup_format=POD_CGROUP, extra_args=extra)
            for node, (ip, mode) in NODES.items()}


def test_one_agent_per_node_from_the_daemonset(home: Path) -> None:
    planned = agents(home, extra=["--cert-ttl=60"])
    for node, (pod, run) in planned.items():
        ip, mode = NODES[node]
        env = dict(run.env)
        assert env["NODE_NAME"] == node and env["REDIRECT_MODE"] == mode
        assert env["POD_NAME"] == pod.name == f"ambient-nodeagent-{node}" and env["POD_NAMESPACE"] == "istio-system"
        assert run.argv[1:3] == ("-m", "nodeagent.main")  # the manifest's command, python -> this interpreter
        assert flag(run.argv, "--node") == [node] and flag(run.argv, "--redirect-mode") == [mode]
        assert flag(run.argv, "--token-file") == [str(components.node_token(home, node))]
        assert flag(run.argv, "--root-cert") == [str(components.root_cert(home))]
        assert flag(run.argv, "--state-dir") == [str(components.node_dir(home, node) / "nodeagent")]
        # The overlay: the control plane's address, the pods' cgroups, pins per cluster; the extras last.
        assert flag(run.argv, "--control-plane") == [f"{GATEWAY}:15012"]
        assert flag(run.argv, "--pod-cgroup") == [POD_CGROUP] and flag(run.argv, "--bpf-prefix") == ["amb-c1"]
        # Pods from the CNI plugin, as the DaemonSet says, on a socket in the node's directory.
        assert flag(run.argv, "--pod-source") == ["cni"] and "--pod-netns" not in run.argv
        assert components.cni_socket(run) == str(components.node_dir(home, node) / "cni.sock")
        assert run.argv[-1] == "--cert-ttl=60"
        assert run.readiness is not None and (run.readiness.port, run.readiness.path) == (15021, "/healthz/ready")
        assert pod.ip == ip and pod.node == node

        opts = nodeagent.main.parse_args(list(run.argv[3:]))
        assert (opts.node, opts.redirect_mode, opts.pod_source, opts.cert_ttl) == (node, mode, "cni", 60)
        assert opts.cni_socket == components.cni_socket(run)


def test_an_agent_that_would_not_take_pods_from_the_plugin_is_refused(home: Path) -> None:
    for extra in (["--pod-source=local"], ["--pod-source", "local"]):
        _, run = agents(home, extra=extra)["node-1"]
        with pytest.raises(components.ComponentError, match="needs --pod-source cni and --cni-socket"):
            components.cni_socket(run)


def test_control_plane_from_the_deployment(home: Path) -> None:
    pod, run = components.plan_control_plane(home, GATEWAY, components.load_workloads().control_plane)
    assert run.argv[1:3] == ("-m", "controlplane.main")
    assert dict(run.env) == {"POD_NAME": "istiod-0", "POD_NAMESPACE": "istio-system"}
    args = controlplane.main.build_parser().parse_args(list(run.argv[3:]))
    assert args.config_source == "local" and args.state_dir == home
    assert args.serving_host[-1] == GATEWAY and "istiod.istio-system.svc" in args.serving_host
    assert run.readiness is not None and (run.readiness.port, run.readiness.path) == (15014, "/healthz/ready")
    assert pod.ip == GATEWAY


def test_the_manifest_is_what_runs(home: Path, tmp_path: Path) -> None:
    base = tmp_path / "daemonset"
    shutil.copytree(DAEMONSET_DIR, base)
    agent = base / "nodeagent.yaml"
    agent.write_text(agent.read_text().replace("        - --log-level\n        - info\n",
                                               "        - --log-level\n        - debug\n", 1))
    for _, run in agents(home, directory=base).values():
        assert flag(run.argv, "--log-level") == ["debug"]


def test_a_manifest_the_local_cluster_cannot_run_is_refused_naming_it(home: Path, tmp_path: Path) -> None:
    base = tmp_path / "daemonset"
    shutil.copytree(DAEMONSET_DIR, base)
    agent = base / "nodeagent.yaml"
    agent.write_text(agent.read_text().replace("      - name: nodeagent\n", "      - name: agent\n", 1))
    with pytest.raises(ManifestError, match=r"daemonset/nodeagent.yaml: document 2 \(DaemonSet "
                                            r"istio-system/ambient-nodeagent\): no container 'nodeagent'"):
        agents(home, directory=base)


def test_workload_record_keeps_the_manifest_and_its_pods(home: Path) -> None:
    workload = components.load_workloads().node_agent
    record = components.workload_record(workload, overlay.NODE_AGENT, [])
    assert (record["kind"], record["namespace"], record["name"], record["container"]) == \
        ("DaemonSet", "istio-system", "ambient-nodeagent", "nodeagent")
    assert record["source"] == "daemonset/nodeagent.yaml" and record["manifest"] == workload.body
    assert record["manifest"] is not workload.body


@pytest.mark.parametrize("argv, edits, expected", [
    (["a", "--x", "1"], [ArgEdit("set", "--x", "2")], ["a", "--x", "2"]),
    (["a", "--x=1"], [ArgEdit("set", "--x", "2")], ["a", "--x=2"]),
    (["a"], [ArgEdit("set", "--x", "2")], ["a", "--x", "2"]),
    (["a", "--h", "n"], [ArgEdit("add", "--h", "m")], ["a", "--h", "n", "--h", "m"]),
    (["a"], [ArgEdit("extra", "--t=1"), ArgEdit("extra", "-v")], ["a", "--t=1", "-v"]),
])
def test_apply_args(argv: list[str], edits: list[ArgEdit], expected: list[str]) -> None:
    assert apply_args(argv, edits) == expected


def test_up_waits_for_the_agents_cni_socket_and_says_why_an_agent_never_opened_it(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_text("discovery: waiting for the control plane\n")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = ProcessRecord("nodeagent node-1", sleeper.pid, processes.start_time(sleeper.pid) or 0, "", str(log))
        path = str(tmp_path / "cni.sock")
        with pytest.raises(components.ComponentError, match=r"nodeagent node-1 did not open its CNI socket .* "
                                                            r"in 0.2s(.|\n)*discovery: waiting"):
            components.wait_cni_socket(path, rec, timeout=0.2)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path)
        listener.listen(1)
        started = time.monotonic()
        components.wait_cni_socket(path, rec, timeout=5)
        assert time.monotonic() - started < 1
        listener.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(components.ComponentError, match="nodeagent node-1 exited while starting"):
        components.wait_cni_socket(path, rec, timeout=5)
