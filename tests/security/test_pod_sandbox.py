"""Item 16: a local cluster's pods run as a container runtime would run them, not as root with every
capability in the host's mount namespace.

- Each pod runs as its own user: `securityContext.runAsUser` / `runAsGroup` of the Pod (or its container,
  which wins), else a uid of its own (`localcluster.sandbox.POD_UID_BASE` + its place in the file).
- No capabilities (bounding, ambient, inheritable, effective: all empty) and `no_new_privs`, so
  `runAsUser: 0` is a root without power, and no set-uid or file-capability binary gives any back.
- A private mount namespace in which the local clusters' state (the CA key, tokens, the control plane's
  store, other pods' logs) is covered by an empty, read-only tmpfs; a waypoint sees only its own
  directory (its token and the trust bundle) there.
- `meshctl exec` runs as the pod's user, with the same sandbox, in the pod's cgroup.

So a pod cannot flush its capture rules, mark its sockets 0x539 to skip capture, or read the CA key,
and the mesh still works: the pod is captured, served, and reachable through a waypoint.
The cluster (`t-sec2-sbx-<pid>`) keeps its state in a directory every user may traverse, so that the
check of what a pod can see does not depend on pytest's private temporary directories.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster.sandbox import POD_UID_BASE
from localcluster.spec import ClusterFileError, parse
from tests.integration.conftest import Meshctl, leftovers
from tests.integration.test_mesh import Mesh, eventually, has_rules

TOOLS = Path(__file__).resolve().parent / "podtools"
PORT = 8080
NAME = f"t-sec2-sbx-{os.getpid() % 100000}"
NS = "sbx"
SERVER_UID, SERVER_GID = 4242, 4343
HEADER = """apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata: {name: c}
spec:
  nodes:
  - {name: node-1, podCIDR: 10.244.1.0/24}
"""


def pod_doc(name: str, security: str = "", container_security: str = "") -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  nodeName: node-1{security}
  containers:
  - name: main
    command: [sleep, infinity]{container_security}
"""


# ---- the cluster file ---------------------------------------------------------------------------------


def test_run_as_user_and_group_come_from_the_security_context() -> None:
    spec = parse(HEADER + pod_doc("a", "\n  securityContext: {runAsUser: 1234, runAsGroup: 99}")
                 + pod_doc("b", "\n  securityContext: {runAsUser: 1234}",
                           "\n    securityContext: {runAsUser: 0, allowPrivilegeEscalation: false,"
                           " capabilities: {drop: [ALL]}}")
                 + pod_doc("c"), Path("c.yaml"))
    a, b, c = spec.pods
    assert (a.run_as_user, a.run_as_group) == (1234, 99)
    assert (b.run_as_user, b.run_as_group) == (0, 0)  # the container's wins; the group follows the user
    assert (c.run_as_user, c.run_as_group) == (POD_UID_BASE + 2, POD_UID_BASE + 2)  # its own, never root


@pytest.mark.parametrize(("security", "message"), [
    ("{runAsUser: -1}", "runAsUser: -1 is out of range"),
    ("{runAsUser: '1000'}", "runAsUser: must be an integer"),
    ("{runAsUser: 2147483648}", "runAsUser: 2147483648 is out of range"),
    ("{runAsGroup: true}", "runAsGroup: must be an integer"),
    ("{runAsNonRoot: true, runAsUser: 0}", "runAsNonRoot: the pod would run as root (runAsUser 0)"),
    ("{privileged: true}", "privileged: pods of the local cluster never run privileged"),
    ("{allowPrivilegeEscalation: true}", "allowPrivilegeEscalation: pods always run with no_new_privs"),
    ("{capabilities: {add: [NET_ADMIN]}}", "capabilities.add: pods of the local cluster run without capabilities"),
    ("{seLinuxOptions: {}}", "securityContext.seLinuxOptions: unknown field"),
    ("[1]", "securityContext: must be a mapping"),
])
def test_a_bad_security_context_is_refused(security: str, message: str) -> None:
    with pytest.raises(ClusterFileError) as err:
        parse(HEADER + pod_doc("a", f"\n  securityContext: {security}"), Path("c.yaml"))
    assert message in str(err.value)


# ---- a real cluster -----------------------------------------------------------------------------------


def cluster_yaml(tools: Path) -> str:
    def pod(name: str, node: str, command: str, security: str = "") -> str:
        ports = f"\n    ports: [{{containerPort: {PORT}}}]" if name == "server" else ""
        return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}}}
spec:
  nodeName: {node}
  serviceAccountName: {name}{security}
  containers:
  - name: main
    command: {command}{ports}
"""
    server = f"[{sys.executable}, -m, http.server, '{PORT}', --bind, 0.0.0.0, --directory, {tools}]"
    accounts = "".join(f"---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {n}, namespace: {NS}}}\n"
                       for n in ("server", "client", "rooted"))
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
{accounts}---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {NS}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: {PORT}}}]
""" + pod("server", "node-1", server, f"\n  securityContext: {{runAsUser: {SERVER_UID}, runAsGroup: {SERVER_GID}}}") \
        + pod("client", "node-2", "[sleep, infinity]") \
        + pod("rooted", "node-1", "[sleep, infinity]", "\n  securityContext: {runAsUser: 0}")


class SandboxMesh(Mesh):
    state_root: Path = Path()

    def probe(self, pod: str, *paths: str | Path) -> dict[str, Any]:
        out = self.exec(NS, pod, sys.executable, str(TOOLS / "sandbox_probe.py"), *map(str, paths), timeout=60)
        found: dict[str, Any] = json.loads(out.stdout)
        return found

    def process(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["processes"] if p["name"] == name)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def no_capabilities(status: dict[str, str]) -> bool:
    return all(int(status[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")) \
        and status["NoNewPrivs"] == "1"


@pytest.fixture(scope="module")
def mesh() -> Iterator[SandboxMesh]:
    if os.geteuid() != 0:
        pytest.skip("builds a real cluster: needs root")
    # Directories every user may traverse, unlike pytest's (0700): the pods must not see the state because
    # it is hidden from them, not because /tmp/pytest-of-root happens to be private.
    work = Path(tempfile.mkdtemp(prefix="t-sec2-sbx-"))
    work.chmod(0o755)
    state_root, files = work / "state", work / "files"
    state_root.mkdir(mode=0o755)
    files.mkdir(mode=0o755)
    (files / "hello.txt").write_text("hello from the server pod\n")
    (files / "hello.txt").chmod(0o644)
    path = files / "cluster.yaml"
    path.write_text(cluster_yaml(files))
    meshctl = Meshctl(state_root)
    m = SandboxMesh(NAME, meshctl)
    m.state_root = state_root
    try:
        meshctl("cluster", "up", "-f", str(path), timeout=600)
        eventually(lambda: all(m.enrollment(n).get(f"{NS}/{p}") == "enrolled"
                               for n, p in (("node-1", "server"), ("node-2", "client"), ("node-1", "rooted"))),
                   timeout=60)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False, timeout=300)
        assert not leftovers(NAME), leftovers(NAME)
        shutil.rmtree(work, ignore_errors=True)


def secrets(mesh: SandboxMesh) -> dict[str, Path]:
    """What no pod may read: the CA key, the token key, node tokens, the control plane's store."""
    cp = mesh.dir / "controlplane"
    return {"ca key": cp / "ca" / "ca-key.pem", "token key": cp / "node-token-key.pem",
            "node token": mesh.dir / "nodes" / "node-1" / "token", "store": cp / "store"}


def test_a_pods_own_process_runs_as_its_user_without_capabilities(mesh: SandboxMesh) -> None:
    status = proc_status(mesh.process(f"pod {NS}/server")["pid"])
    assert status["Uid"].split() == [str(SERVER_UID)] * 4
    assert status["Gid"].split() == [str(SERVER_GID)] * 4
    assert status["Groups"] == ""
    assert no_capabilities(status), status
    client = proc_status(mesh.process(f"pod {NS}/client")["pid"])
    assert int(client["Uid"].split()[0]) == POD_UID_BASE + 1  # the second pod of the file
    assert no_capabilities(client), client


def test_exec_runs_as_the_pods_user(mesh: SandboxMesh) -> None:
    assert mesh.exec(NS, "server", "id", "-u").stdout.strip() == str(SERVER_UID)
    assert mesh.exec(NS, "server", "id", "-g").stdout.strip() == str(SERVER_GID)
    assert mesh.exec(NS, "client", "id", "-u").stdout.strip() == str(POD_UID_BASE + 1)
    assert mesh.exec(NS, "rooted", "id", "-u").stdout.strip() == "0"


@pytest.mark.parametrize("pod", ["server", "client", "rooted"])
def test_a_pod_cannot_skip_or_undo_its_capture_nor_read_the_mesh_state(mesh: SandboxMesh, pod: str) -> None:
    found = mesh.probe(pod, mesh.state_root, *secrets(mesh).values())
    assert no_capabilities(found["status"]), found["status"]
    assert found["so_mark"] == "EPERM"
    assert found["iptables_flush"]["status"] != 0, found["iptables_flush"]
    assert found["listing"].get(str(mesh.state_root)) == []  # an empty tmpfs over the clusters' state
    for what, path in secrets(mesh).items():
        assert found["paths"][str(path)] == "absent", f"{what} {path}: {found['paths'][str(path)]}"
    assert has_rules(mesh.pod_netns(NS, pod))  # the capture is intact


def test_pods_are_still_served_through_the_mesh(mesh: SandboxMesh) -> None:
    out = mesh.curl(NS, "client", f"http://server:{PORT}/hello.txt")
    assert out.stdout == "hello from the server pod\n", out.stderr
    assert has_rules(mesh.pod_netns(NS, "client")) and has_rules(mesh.pod_netns(NS, "server"))


def test_a_waypoint_runs_sandboxed_and_still_serves(mesh: SandboxMesh) -> None:
    mesh.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")

    def waypoint_running() -> bool:
        return any(p["name"] == f"waypoint {NS}/waypoint" for p in mesh.status()["processes"])

    eventually(waypoint_running, timeout=60)
    pid = mesh.process(f"waypoint {NS}/waypoint")["pid"]
    status = proc_status(pid)
    assert int(status["Uid"].split()[0]) != 0
    assert no_capabilities(status), status
    mounts = Path(f"/proc/{pid}/mountinfo").read_text()
    assert f" {mesh.state_root} " in mounts  # the clusters' state is covered ...
    own = mesh.dir / "waypoints" / NS / "waypoint"
    assert f" {own} " in mounts  # ... but its own directory, read-only
    def visible(path: Path) -> bool:  # in the waypoint's mount namespace
        return subprocess.run(["nsenter", "-t", str(pid), "-m", "test", "-e", str(path)]).returncode == 0

    assert not visible(secrets(mesh)["ca key"])
    assert not visible(secrets(mesh)["node token"])
    assert visible(own / "token")

    def through_waypoint() -> bool:
        out = mesh.curl(NS, "client", f"http://server:{PORT}/hello.txt")
        log = (mesh.dir / "logs" / f"{NS}.waypoint.log")
        return out.stdout == "hello from the server pod\n" and log.exists() and "hello.txt" in log.read_text()

    eventually(through_waypoint, timeout=60, interval=1.0)
