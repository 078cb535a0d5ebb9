"""Item 13 on a real cluster: rotations while traffic flows, through the node agents and a waypoint.

- `meshctl ca rotate-token-key --overlap 0s`: every token signed by the old key is refused at once (a
  real CreateCertificate from a node's namespace with the old node token: UNAUTHENTICATED), the cluster's
  controller gives the node agents and the waypoint new tokens within a second or two, and the mesh
  carries on (their CA calls succeed with the new tokens).
- `meshctl ca rotate-root`: while a client keeps calling a server through the waypoint, the new root is
  added, then signs, then the old one is dropped; no request fails, and at the end every certificate the
  agents hold chains to the new root, the only one in the bundle (also the waypoint's copy of it).

The cluster (`t-sec2-rot-<pid>`) lives under a temporary state directory and is always torn down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mesh.api.client import ApiClient
from tests.integration.conftest import ROOT, Meshctl, leftovers
from tests.integration.test_mesh import Mesh, eventually

pytestmark = [pytest.mark.root, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="builds a real cluster: needs root")]

NAME = f"t-sec2-rot-{os.getpid() % 100000}"
NS = "rot"
PORT = 8080
TOOLS = Path(__file__).resolve().parent / "podtools"
URL = f"http://server:{PORT}/whoami.py"


def cluster_yaml() -> str:
    return f"""apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata: {{name: {NAME}}}
spec:
  nodes:
  - {{name: node-1, podCIDR: 10.244.1.0/24}}
  - {{name: node-2, podCIDR: 10.244.2.0/24}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: server, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {NS}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {NS}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: {PORT}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {NS}, labels: {{app: server}}}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers:
  - name: main
    command: [{sys.executable}, -m, http.server, "{PORT}", --bind, 0.0.0.0, --directory, {TOOLS}]
    ports: [{{containerPort: {PORT}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}
spec:
  nodeName: node-2
  serviceAccountName: client
  containers:
  - name: main
    command: [sleep, infinity]
"""


class RotMesh(Mesh):
    @property
    def api(self) -> ApiClient:
        return ApiClient(self.dir / "controlplane" / "api.sock", timeout=10)

    def ok(self) -> bool:
        out = self.curl(NS, "client", URL, "--fail")
        return out.returncode == 0 and "def serve" in out.stdout

    def waypoint_log(self) -> str:
        path = self.dir / "logs" / f"{NS}.waypoint.log"
        return path.read_text() if path.exists() else ""

    def ca_call(self, node: str, token_file: Path, identity: str) -> str:
        """A CreateCertificate from the node's namespace, as its agent makes them."""
        gateway = self.status()["plan"]["underlay"]["gateway"]
        out = subprocess.run(["ip", "netns", "exec", f"amb.{self.name}.node.{node}", sys.executable, "-m",
                              "tests.security.ca_call", f"{gateway}:15012", str(self.dir / "controlplane" / "ca" /
                                                                                   "root-cert.pem"),
                              str(token_file), identity, "impersonate"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        return (out.stdout.strip() or out.stderr.strip()).splitlines()[-1]

    def agent_certs(self, node: str) -> list[dict[str, object]]:
        out = self.ctl("agent", "certs", node, "-o", "json")
        found: list[dict[str, object]] = json.loads(out.stdout)["certificates"]
        return found


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RotMesh]:
    tmp = tmp_path_factory.mktemp("rot-cluster")
    meshctl = Meshctl(tmp / "state")
    path = tmp / "cluster.yaml"
    path.write_text(cluster_yaml())
    m = RotMesh(NAME, meshctl)
    try:
        meshctl("cluster", "up", "-f", str(path), timeout=600)
        eventually(lambda: m.enrollment("node-1").get(f"{NS}/server") == "enrolled"
                   and m.enrollment("node-2").get(f"{NS}/client") == "enrolled", timeout=60)
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")

        def through_waypoint() -> bool:
            """the client reaches the server through the waypoint"""
            return m.ok() and "whoami.py" in m.waypoint_log()

        eventually(through_waypoint, timeout=90, interval=1.0)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False, timeout=300)
        assert not leftovers(NAME), leftovers(NAME)


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def test_rotating_the_token_key_revokes_old_tokens_and_the_mesh_carries_on(mesh: RotMesh, tmp_path: Path) -> None:
    node_token = mesh.dir / "nodes" / "node-1" / "token"
    waypoint_token = mesh.dir / "waypoints" / NS / "waypoint" / "token"
    old = tmp_path / "old-token"
    old.write_text(node_token.read_text())
    server = f"spiffe://cluster.local/ns/{NS}/sa/server"
    assert mesh.ca_call("node-1", old, server).startswith("ok ")
    out = mesh.ctl("ca", "rotate-token-key", "--overlap", "0s")
    assert "refused from now on" in out.stdout
    current = mesh.api.token_key_status()["current"]
    assert kid(old.read_text()) != current

    def renewed() -> bool:
        """the controller gave the agent and the waypoint tokens of the new key"""
        return kid(node_token.read_text()) == current and kid(waypoint_token.read_text()) == current

    eventually(renewed, timeout=10)
    refusal = mesh.ca_call("node-1", old, server)
    assert refusal.startswith("UNAUTHENTICATED"), refusal
    assert mesh.ca_call("node-1", node_token, server).startswith("ok ")
    for _ in range(3):
        assert mesh.ok()


def test_rotating_the_root_keeps_traffic_flowing(mesh: RotMesh) -> None:
    bundle = mesh.dir / "controlplane" / "ca" / "root-cert.pem"
    old_root = x509.load_pem_x509_certificates(bundle.read_bytes())
    failures: list[str] = []
    done = threading.Event()
    calls = 0

    def client() -> None:
        nonlocal calls
        while not done.is_set():
            out = mesh.curl(NS, "client", URL, "--fail")
            calls += 1
            if out.returncode != 0 or "def serve" not in out.stdout:
                failures.append(f"{time.strftime('%X')} {out.returncode} {out.stderr.strip()}")
            time.sleep(0.1)

    traffic = threading.Thread(target=client, daemon=True)
    traffic.start()
    try:
        time.sleep(1)
        mesh.ctl("ca", "rotate-root", "--propagation", "4s", "--overlap", "10s")
        assert len(x509.load_pem_x509_certificates(bundle.read_bytes())) == 2
        eventually(lambda: mesh.api.root_status()["phase"] == "idle", timeout=60, interval=0.5)
        time.sleep(3)  # traffic after the old root is gone
    finally:
        done.set()
        traffic.join(60)
    assert failures == [], failures
    assert calls > 10
    roots = x509.load_pem_x509_certificates(bundle.read_bytes())
    assert len(roots) == 1 and roots[0] != old_root[0]
    new = roots[0].fingerprint(hashes.SHA256()).hex()
    assert mesh.api.root_status()["signingRoot"] == new
    for node in ("node-1", "node-2"):
        held = [c for c in mesh.agent_certs(node) if c["not_after"]]
        assert held and all(c["root"] == new for c in held), held
    assert (mesh.dir / "waypoints" / NS / "waypoint" / "root-cert.pem").read_bytes() == bundle.read_bytes()
    assert mesh.ok()
