"""The per-pod DNS capture opt-out and `meshctl waypoint config`, in a real local cluster, in both capture
modes at once (node-1's agent captures with iptables, node-2's with eBPF).

Each node runs two ambient pods: `plain-N`, whose DNS goes to the agent's DNS proxy, and `quiet-N`,
annotated `ambient.istio.io/dns-capture: "false"` (Istio's per-pod switch), whose DNS is left alone.  The
annotation travels as it would on Kubernetes: the runtime hands the pod's annotations to the CNI plugin
(the capability it declares), the plugin to the node agent, the agent into the pod's capture.  The pods'
resolv.conf names 127.0.0.1, which nothing in the pod serves: only a captured pod gets an answer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Meshctl
from tests.integration.test_mesh import Mesh, eventually

PODTOOLS = Path(__file__).resolve().parent / "podtools"
NAME = "t-gap"
NODES = ("node-1", "node-2")


def pod(name: str, node: str, annotations: str = "") -> str:
    return f"""
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: apps
  labels: {{app: {name.split('-')[0]}}}
  {f'annotations: {annotations}' if annotations else ''}
spec:
  nodeName: {node}
  containers:
  - name: echo
    command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "7000"]
    ports: [{{containerPort: 7000}}]
"""


CLUSTER = f"""
apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata:
  name: {NAME}
spec:
  serviceCIDR: 10.96.0.0/16
  nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
    redirectMode: iptables
  - name: node-2
    podCIDR: 10.244.2.0/24
    redirectMode: ebpf
---
apiVersion: v1
kind: Namespace
metadata:
  name: apps
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: apps
spec:
  selector: {{app: plain}}
  ports: [{{port: 7000, name: tcp}}]
""" + "".join(pod(f"plain-{n[-1]}", n) + pod(f"quiet-{n[-1]}", n, '{ambient.istio.io/dns-capture: "false"}')
              for n in NODES)

# A raw DNS query to the pod's nameserver (127.0.0.1:53): the answers, or what went wrong.
QUERY = r"""
import json, random, socket, struct
name = "hello.apps.svc.cluster.local"
qid = random.randrange(1 << 16)
q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
q += b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(q, ("127.0.0.1", 53))
    data = s.recv(4096)
    print(json.dumps({"answers": socket.inet_ntoa(data[-4:]) if struct.unpack_from("!H", data, 6)[0] else None}))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__}))
"""


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("gap")
    path = tmp / f"{NAME}.yaml"
    path.write_text(CLUSTER)
    m = Mesh(NAME, meshctl, "mixed")
    try:
        meshctl("cluster", "up", "-f", str(path))

        def enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(f"apps/{p}-{n[-1]}") == "enrolled" for p in ("plain", "quiet") for n in NODES)

        eventually(enrolled, timeout=30)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False)


def query(mesh: Mesh, pod: str) -> dict:
    out = mesh.exec("apps", pod, sys.executable, "-c", QUERY, check=False)
    assert out.returncode == 0, out.stderr
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("node", NODES)
def test_a_pod_that_opts_out_keeps_its_own_dns_and_its_tcp_capture(mesh: Mesh, node: str) -> None:
    n = node[-1]
    hello = next(s["clusterIP"] for s in mesh.status()["plan"]["services"] if s["name"] == "hello")
    assert query(mesh, f"plain-{n}") == {"answers": hello}  # the agent's DNS proxy answered
    assert "error" in query(mesh, f"quiet-{n}")  # nobody serves 127.0.0.1:53 in the pod: not captured
    # Its TCP is still the mesh's: its connection to the service goes through the agent.
    out = mesh.exec("apps", f"quiet-{n}", sys.executable, str(PODTOOLS / "dns_client.py"), "connect", hello, "7000")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [{"echo": "hello\n"}]

    def carried() -> bool:
        return any(e.get("direction") == "outbound" and e.get("source_workload") == f"quiet-{n}"
                   for e in mesh.access_log(node))

    eventually(carried, timeout=10)


def test_meshctl_waypoint_config_shows_what_the_waypoint_holds(mesh: Mesh) -> None:
    mesh.ctl("waypoint", "apply", "-n", "apps", "--enroll-namespace", "--timeout", "60")

    def holds_hello() -> bool:
        out = mesh.ctl("waypoint", "config", "-n", "apps", "-o", "json", check=False)
        return out.returncode == 0 and "hello.apps.svc.cluster.local" in json.loads(out.stdout)["services"]

    eventually(holds_hello, timeout=30, interval=0.5)
    text = mesh.ctl("waypoint", "config", "-n", "apps").stdout
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["waypoint", "apps/waypoint", "identity", "spiffe://cluster.local/ns/apps/sa/waypoint"]
    assert "  hello.apps.svc.cluster.local" in lines[lines.index("SERVICES (clusters)"):]
    missing = mesh.ctl("waypoint", "config", "-n", "apps", "nosuch", check=False)
    assert missing.returncode == 1 and "no waypoint 'nosuch' in namespace 'apps'" in missing.stderr
