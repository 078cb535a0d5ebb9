"""The agent items for real, on a small local cluster (`meshctl cluster up`, root): node-1 captures with
eBPF, node-2 with iptables, every pod runs a server that says who it sees as its peer.

- Source address: across nodes and modes, in the mesh (HBONE) and from outside it (plaintext on 15006),
  the application sees the client pod's address, not its own.
- Self-loops: a pod's application calling its agent directly (127.0.0.1:15001, its own address on 15001
  and 15006), through the mesh to another pod's 15006 (an HBONE CONNECT to podIP:15006), or from
  outside the mesh to a pod's 15001: each is refused at once, and neither agent's descriptors grow.

The cluster is named `t-sec-agent-<pid>`, lives under a temporary state directory and is always torn down.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Meshctl, leftovers
from tests.integration.test_mesh import Mesh, eventually

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="builds a real cluster: needs root")]

NAME = f"t-sec-agent-{os.getpid()}"  # unique: several people may run the suite at once (20 characters at most)
TOOLS = Path(__file__).resolve().parent / "podtools"
PORT = 8080


def cluster_yaml() -> str:
    def pod(name: str, ns: str, node: str) -> str:
        return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: whoami}}}}
spec:
  nodeName: {node}
  serviceAccountName: {name if ns == "sec" else "default"}
  containers:
  - name: whoami
    command: [{sys.executable}, {TOOLS / 'whoami.py'}, "{PORT}"]
    ports: [{{containerPort: {PORT}}}]
"""
    pods = [("whoami-1", "sec", "node-1"), ("whoami-2", "sec", "node-2"), ("client-1", "sec", "node-1"),
            ("client-2", "sec", "node-2"), ("outsider", "outside", "node-1")]
    accounts = "".join(f"---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {n}, namespace: sec}}\n"
                       for n, ns, _ in pods if ns == "sec")
    return f"""apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata:
  name: {NAME}
spec:
  serviceCIDR: 10.96.0.0/16
  nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
    redirectMode: ebpf
  - name: node-2
    podCIDR: 10.244.2.0/24
---
apiVersion: v1
kind: Namespace
metadata: {{name: sec, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: default, namespace: outside}}
{accounts}---
apiVersion: v1
kind: Service
metadata: {{name: whoami, namespace: sec}}
spec:
  selector: {{app: whoami}}
  ports: [{{port: {PORT}}}]
""" + "".join(pod(*p) for p in pods)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("sec-cluster")
    meshctl = Meshctl(tmp / "state")
    path = tmp / "cluster.yaml"
    path.write_text(cluster_yaml())
    m = Mesh(NAME, meshctl)
    try:
        meshctl("cluster", "up", "-f", str(path), timeout=600)

        def all_enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(f"sec/{p}") == "enrolled" for p in ("whoami-1", "whoami-2", "client-1", "client-2"))

        eventually(all_enrolled, timeout=60)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False, timeout=300)
        assert not leftovers(NAME), leftovers(NAME)


def ask(mesh: Mesh, ns: str, pod: str, host: str, port: int = PORT) -> str:
    out = mesh.exec(ns, pod, sys.executable, str(TOOLS / "ask.py"), host, str(port), check=False, timeout=60)
    return (out.stdout.strip() or out.stderr.strip()).splitlines()[-1]


def seen_ip(answer: str) -> str:
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", answer), answer
    return answer.rpartition(":")[0]


def agent_fds(mesh: Mesh, node: str) -> int:
    return len(os.listdir(f"/proc/{mesh.agent(node)['pid']}/fd"))


@pytest.mark.parametrize(("client", "server"), [
    (("sec", "client-1"), "whoami-2"),  # eBPF node -> iptables node, HBONE
    (("sec", "client-2"), "whoami-1"),  # iptables node -> eBPF node, HBONE
    (("sec", "client-1"), "whoami-1"),  # the same eBPF node
    (("sec", "client-2"), "whoami-2"),  # the same iptables node
    (("outside", "outsider"), "whoami-1"),  # outside the mesh: plaintext, captured to 15006 (eBPF)
    (("outside", "outsider"), "whoami-2"),  # outside the mesh: plaintext, captured to 15006 (iptables)
])
def test_the_application_sees_the_clients_address(mesh: Mesh, client: tuple[str, str], server: str) -> None:
    ns, pod = client
    answer = eventually(lambda: (a := ask(mesh, ns, pod, mesh.pod_ip("sec", server))) and ":" in a and a,
                        timeout=20)
    assert seen_ip(str(answer)) == mesh.pod_ip(ns, pod), f"{server} saw {answer}, not {pod}"


def test_through_a_service_too(mesh: Mesh) -> None:
    for _ in range(4):
        assert seen_ip(ask(mesh, "sec", "client-2", "whoami.sec")) == mesh.pod_ip("sec", "client-2")


def test_calls_to_the_agent_itself_are_refused_and_cost_nothing(mesh: Mesh) -> None:
    before = {node: agent_fds(mesh, node) for node in ("node-1", "node-2")}
    calls = []
    for pod in ("client-1", "client-2"):  # one per capture mode
        own = mesh.pod_ip("sec", pod)
        calls += [("sec", pod, "127.0.0.1", 15001), ("sec", pod, own, 15001), ("sec", pod, own, 15006),
                  ("sec", pod, mesh.pod_ip("sec", "whoami-1"), 15006),  # HBONE CONNECT to podIP:15006
                  ("sec", pod, mesh.pod_ip("sec", "whoami-2"), 15001)]
    calls += [("outside", "outsider", mesh.pod_ip("sec", server), port)  # plaintext to a pod's agent ports
              for server in ("whoami-1", "whoami-2") for port in (15001, 15006)]
    for ns, pod, host, port in calls:
        answer = ask(mesh, ns, pod, host, port)
        assert answer == "closed" or answer.startswith("error"), f"{pod} -> {host}:{port} answered {answer!r}"
    after = {node: agent_fds(mesh, node) for node in ("node-1", "node-2")}
    for node in before:
        assert after[node] < before[node] + 40, f"the agent of {node} went from {before[node]} to {after[node]} fds"
    metrics = mesh.metrics("node-1") + mesh.metrics("node-2")
    assert 'reason="self_call"' in metrics
