"""A node agent killed with SIGKILL comes back by itself, as a DaemonSet's pod would (security and
reliability issue: supervision).

On a two-node cluster, a meshed client on node-1 talks to a meshed echo server on node-2 over HBONE.
The destination's agent is killed (`kill -9`): the cluster's controller finds it gone and starts it
again (with backoff), the new agent adopts the pods' capture, traffic through the mesh works again, and
`meshctl cluster status` counts the restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from localcluster.processes import ProcessRecord, is_running
from tests.integration.conftest import Meshctl
from tests.integration.test_mesh import PODTOOLS, Mesh, eventually

NAME = "t-sec"
AGENT = "nodeagent node-2"

CLUSTER = f"""
apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata: {{name: {NAME}}}
spec:
  nodes:
  - {{name: node-1, podCIDR: 10.244.1.0/24}}
  - {{name: node-2, podCIDR: 10.244.2.0/24}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client}}}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers:
  - command: [{sys.executable}, -c, "import time; time.sleep(100000)"]
---
apiVersion: v1
kind: Pod
metadata: {{name: echo, namespace: shop, labels: {{app: echo}}}}
spec:
  nodeName: node-2
  containers:
  - command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "7000"]
    ports: [{{containerPort: 7000}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: shop}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 7000}}]
"""

ROUND_TRIP = ("import socket,sys; s=socket.create_connection(('echo',7000),timeout=5); s.sendall(b'ping'); "
              "s.shutdown(socket.SHUT_WR); d=b''\n"
              "while (c:=s.recv(100)): d+=c\n"
              "sys.exit(0 if d==b'ping' else 1)")


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    path = tmp_path_factory.mktemp("supervision") / "cluster.yaml"
    path.write_text(CLUSTER)
    m = Mesh(NAME, meshctl)
    try:
        meshctl("cluster", "up", "-f", str(path), timeout=300)

        def enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return states.get("shop/client") == "enrolled" and states.get("shop/echo") == "enrolled"

        eventually(enrolled, timeout=60)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False)


def round_trip(mesh: Mesh) -> bool:
    """The client's bytes came back from the echo server on the other node."""
    return mesh.exec("shop", "client", sys.executable, "-c", ROUND_TRIP, check=False, timeout=30).returncode == 0


def tunnelled(mesh: Mesh) -> int:
    """Connections node-2's agent took in over HBONE from the client (mutual TLS)."""
    return sum(1 for e in mesh.access_log("node-2") if e.get("direction") == "inbound"
               and e.get("connection_security_policy") == "mutual_tls"
               and e.get("source_principal") == "spiffe://cluster.local/ns/shop/sa/client")


def test_a_killed_agent_comes_back_and_traffic_flows_again(mesh: Mesh) -> None:
    assert eventually(lambda: round_trip(mesh), timeout=30)
    before = mesh.agent("node-2")
    assert before["running"] and before.get("restarts", 0) == 0
    through_mesh = tunnelled(mesh)
    assert through_mesh >= 1

    os.kill(before["pid"], signal.SIGKILL)

    def back() -> dict | None:
        """node-2's agent runs again, as a new process, counted as a restart."""
        now = mesh.agent("node-2")
        return now if now["running"] and now["pid"] != before["pid"] and now.get("restarts") == 1 else None

    after = eventually(back, timeout=60)
    assert isinstance(after, dict) and is_running(ProcessRecord.from_json(after))
    assert eventually(lambda: round_trip(mesh), timeout=60), "traffic did not flow again after the restart"
    assert tunnelled(mesh) > through_mesh  # through the new agent, over HBONE
    assert mesh.enrollment("node-2").get("shop/echo") == "enrolled"

    text = mesh.meshctl("cluster", "status", NAME).stdout
    line = next(row for row in text.splitlines() if row.startswith(AGENT))
    assert "Running" in line and " 1 (last " in line, text
    controller_log = (mesh.dir / "logs" / "controller.log").read_text()
    assert any('"event": "restarted"' in row and AGENT in row for row in controller_log.splitlines())
    assert json.loads(mesh.meshctl("cluster", "status", NAME, "-o", "json").stdout)["phase"] == "ready"


def test_the_controller_flags_are_checked() -> None:
    out = subprocess.run([sys.executable, "-m", "localcluster.controller", "--cluster", NAME,
                          "--restart-backoff", "0"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "the restart backoff must be above 0 seconds" in out.stderr
