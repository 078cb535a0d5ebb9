"""`python -m nodeagent.main --pod-source cni` as a real process against a real control plane, with the
real plugin handing it a pod (no root needed: the pod is outside the mesh, so nothing is captured, and
its "network namespace" is the plugin's own): the production assembly answers on its socket, keeps the
pod in its record and lets go of it on DEL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import ControlPlaneThread
from controlplane.options import Options
from mesh.api.client import ApiClient, register_cluster_objects
from nodeagent import main as nodeagent_main
from tests.unit.nodeagent.test_nodeagent_process import fetch, free_port

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]
WRAPPER = ROOT / "nodeagent" / "cni" / "ambient-cni"
PREV_RESULT = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
               "ips": [{"address": "10.244.1.7/24", "interface": 0}]}


def plugin(command: str, sock: Path) -> subprocess.CompletedProcess[bytes]:
    conf = {"cniVersion": "1.0.0", "name": "pods", "type": "ambient-cni", "agentSocket": str(sock),
            "agentTimeout": 10, "prevResult": PREV_RESULT}
    env = {"PATH": os.environ["PATH"], "AMBIENT_CNI_PYTHON": sys.executable, "CNI_COMMAND": command,
           "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"}
    return subprocess.run([str(WRAPPER)], input=json.dumps(conf).encode(), capture_output=True, env=env, timeout=30,
                          check=False)


def test_pod_source_flags(tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_text("x")
    (tmp_path / "token").write_text("x")
    common = ["--node", "n", "--control-plane", "cp:15012", "--root-cert", str(tmp_path / "root.pem"),
              "--token-file", str(tmp_path / "token")]
    opts = nodeagent_main.parse_args([*common, "--pod-source", "cni", "--cni-socket", "/run/a.sock"])
    assert (opts.pod_source, opts.cni_socket, opts.pod_netns) == ("cni", "/run/a.sock", "")
    assert nodeagent_main.parse_args(common + ["--pod-netns", "/x/{name}"]).pod_source == "local"
    with pytest.raises(SystemExit):
        nodeagent_main.parse_args(common)  # local needs --pod-netns


def test_the_agent_process_takes_pods_from_the_cni_plugin(tmp_path: Path) -> None:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    home = tmp_path / "controlplane"
    api = ApiClient(home / "api.sock", timeout=10)
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop"},
                           "spec": {"nodeName": "node-1", "containers": [{"name": "web", "command": ["sleep", "1"]}]}}
    register_cluster_objects(home / "api.sock", [pod])  # with its namespace (not in the mesh) and account
    token = tmp_path / "token"
    token.write_text(api.node_token("node-1"))
    sock, state = tmp_path / "run" / "cni.sock", tmp_path / "agent"
    ready = free_port()
    log = tmp_path / "nodeagent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.main", "--node", "node-1", "--pod-source", "cni", "--cni-socket", str(sock),
             "--state-dir", str(state), "--control-plane", f"127.0.0.1:{running.grpc_port}",
             "--root-cert", str(home / "ca" / "root-cert.pem"), "--token-file", str(token),
             "--admin-listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}",
             "--ready-listen", f"127.0.0.1:{ready}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and fetch(ready, "/healthz/ready")[0] == 200):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert sock.stat().st_mode & 0o777 == 0o600

        add = plugin("ADD", sock)
        assert add.returncode == 0, add
        assert json.loads(add.stdout) == PREV_RESULT
        assert b"pod shop/web-0: not-in-mesh" in add.stderr
        record = json.loads((state / "cni" / "pods.json").read_text())
        assert [(r["pod"]["namespace"], r["pod"]["name"], r["pod"]["ips"]) for r in record] == [
            ("shop", "web-0", ["10.244.1.7"])]

        delete = plugin("DEL", sock)
        assert (delete.returncode, delete.stdout) == (0, b"")
        assert json.loads((state / "cni" / "pods.json").read_text()) == []

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not sock.exists()  # its own socket, removed on the way out
        text = log.read_text()
        assert '"event": "cni add", "pod": "shop/web-0", "result": "not-in-mesh"' in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cp.stop()
