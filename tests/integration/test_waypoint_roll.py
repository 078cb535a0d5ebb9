"""A change of a running waypoint's worker count rolls its pod under load, dropping no request.

A small cluster (`t-roll`): a web server pod on node-2 and a client pod on node-1 in an ambient namespace
bound to a waypoint.  The client sends 20 requests a second to the web service, each on a new connection,
while `meshctl waypoint apply --workers 2` changes the Gateway: the controller starts a second pod of the
waypoint beside the first, waits until it is Ready, then retires the first (not Ready, drained, stopped).
None of the requests may fail, the new pod's waypoint runs two workers, and it carries the traffic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster.waypoints import GATEWAY_NAME_LABEL
from tests.integration.conftest import Meshctl, two_node_cluster
from tests.integration.test_mesh import Mesh, eventually
from tests.integration.test_waypoint_lifecycle import LOAD

CLUSTER = "t-roll"
NS = "roll"
PORT = 8080


def cluster(tools: Path) -> str:
    return f"""
{two_node_cluster(CLUSTER)}
apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: web, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: {NS}
  labels: {{app: web}}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - name: web
    command: [{sys.executable}, -m, http.server, "{PORT}", --bind, 0.0.0.0, --directory, {tools}]
    ports: [{{name: http, containerPort: {PORT}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {NS}
  labels: {{app: client}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers:
  - name: client
    command: [{sys.executable}, -c, "import time; time.sleep(86400)"]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {NS}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: {PORT}, targetPort: {PORT}}}]
"""


class Roll(Mesh):
    tools: Path = Path()

    def waypoint_pods(self) -> list[dict[str, Any]]:
        """The waypoint's pods in the cluster record, oldest first."""
        return [p for p in self.status()["plan"]["pods"]
                if p.get("waypoint") and (p.get("labels") or {}).get(GATEWAY_NAME_LABEL) == "waypoint"]

    def served_by(self, pod: str) -> int:
        """Requests to the web service in the access log of the waypoint pod `pod`."""
        path = self.dir / "logs" / f"{NS}.{pod}.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return sum(1 for line in lines if line.startswith("{") and json.loads(line).get("authority") == f"web:{PORT}")

    def workers(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        out = subprocess.run(["ip", "netns", "exec", pod["netns"], "curl", "-sS", "-m", "5",
                              "http://127.0.0.1:15000/workers"], capture_output=True, text=True)
        return list(json.loads(out.stdout)["workers"]) if out.returncode == 0 and out.stdout.startswith("{") else []


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[Roll]:
    tools = pod_files("roll-tools")
    (tools / "load.py").write_text(LOAD)
    path = tmp_path_factory.mktemp("roll") / f"{CLUSTER}.yaml"
    path.write_text(cluster(tools))
    m = Roll(CLUSTER, meshctl)
    m.tools = tools
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace", "--drain-seconds", "2")
        yield m
    finally:
        meshctl("cluster", "down", CLUSTER, check=False)


def test_a_worker_count_change_rolls_the_waypoint_without_failing_a_request(mesh: Roll) -> None:
    [old] = mesh.waypoint_pods()
    assert old["name"] == "waypoint" and old["workers"] == 1
    stop = mesh.tools / "stop"
    stop.unlink(missing_ok=True)
    spec = {"host": "web", "port": PORT, "path": "/", "rate": 20, "timeout": 10, "stop": str(stop)}
    load = mesh.meshctl.popen("exec", "--cluster", CLUSTER, "-n", NS, "client", "--", sys.executable,
                              str(mesh.tools / "load.py"), json.dumps(spec))
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "started"

        def through_old() -> bool:
            """the load's requests are carried by the first waypoint pod"""
            return mesh.served_by("waypoint") >= 20

        eventually(through_old, timeout=60, interval=0.5)

        applied = mesh.ctl("waypoint", "apply", "-n", NS, "--drain-seconds", "2", "--workers", "2")
        assert applied.stdout.splitlines() == [f"waypoint {NS}/waypoint applied", f"waypoint {NS}/waypoint is ready"]
        status = mesh.ctl("waypoint", "status", "-n", NS).stdout.splitlines()
        assert status[0].split()[7] == "WORKERS", status
        row = status[1].split()
        new_name = row[4]
        assert row[1] == "waypoint" and row[3] == "Ready" and new_name.startswith("waypoint-") and row[7] == "2", status

        def old_gone() -> bool:
            """the first pod drained and went; only the new one is left"""
            return [p["name"] for p in mesh.waypoint_pods()] == [new_name]

        eventually(old_gone, timeout=30, interval=0.5)
        [new] = mesh.waypoint_pods()
        assert new["workers"] == 2 and new["netns"] != old["netns"] and new["ip"] != old["ip"]
        assert len(mesh.workers(new)) == 2  # what the new waypoint itself says it runs
        served = mesh.served_by(new_name)

        def through_new() -> bool:
            """the load goes on through the new pod"""
            return mesh.served_by(new_name) >= served + 20

        eventually(through_new, timeout=30, interval=0.5)
    finally:
        stop.touch()
        out, _ = load.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["failed"] == 0 and result["status"] == {"200": result["ok"]}, result
    # every request answered; the load spanned the roll (20 through the old pod, then 20 more through the new
    # one, checked above): how many it sent in all is the roll's speed, not the test's to judge
    assert result["ok"] == result["sent"] and result["sent"] >= 40, result
    events = (mesh.dir / "logs" / "controller.log").read_text()
    rolled = [e for e in events.splitlines() if '"event": "waypoint rolled"' in e]
    assert len(rolled) == 1 and f'"pod": "{new_name}"' in rolled[0] and '"old pod": "waypoint"' in rolled[0], rolled
