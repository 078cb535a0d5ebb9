"""Enabling and removing a waypoint under load drops no request.

One bookinfo cluster (`t-wpops`) in the mesh.  A client in the sleep pod sends steady HTTP load to reviews
(one new connection per request, as a curl loop does) while `meshctl waypoint apply --enroll-namespace`
starts the waypoint and binds the namespace once it is ready, and `meshctl waypoint delete` unbinds it,
waits for the node agents, and lets the waypoint drain.  The client counts every request; none may fail.
Also: a waypoint is refused in a namespace that does not exist (no Gateway is written, so nothing starts).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Meshctl, cluster_file
from tests.integration.test_mesh import Mesh, eventually

NS = "bookinfo"
CLUSTER = "t-wpops"

# Runs inside the sleep pod: GET http://HOST:PORT/PATH at RATE per second, each on a new connection, until
# the file STOP exists; prints "started" at once, then one JSON object with the counts and the failures.
LOAD = '''
import http.client, json, os, sys, threading, time
from concurrent.futures import ThreadPoolExecutor

spec = json.loads(sys.argv[1])
lock = threading.Lock()
out = {"sent": 0, "ok": 0, "failed": 0, "status": {}, "errors": []}


def one(i):
    conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=spec["timeout"])
    try:
        conn.request("GET", spec["path"], headers={"connection": "close"})
        resp = conn.getresponse()
        resp.read()
        result = str(resp.status)
    except (OSError, http.client.HTTPException) as exc:
        result = "error " + type(exc).__name__ + ": " + str(exc)
    finally:
        conn.close()
    with lock:
        out["status"][result[:40]] = out["status"].get(result[:40], 0) + 1
        if result == "200":
            out["ok"] += 1
        else:
            out["failed"] += 1
            if len(out["errors"]) < 50:
                out["errors"].append([round(time.time(), 3), i, result])


print("started", flush=True)
with ThreadPoolExecutor(max_workers=64) as pool:
    next_at = time.monotonic()
    i = 0
    while not os.path.exists(spec["stop"]):
        pool.submit(one, i)
        out["sent"] += 1
        i += 1
        next_at += 1.0 / spec["rate"]
        time.sleep(max(0.0, next_at - time.monotonic()))
print(json.dumps(out), flush=True)
'''


class Lifecycle(Mesh):
    tools: Path = Path()

    def waypoint_log(self) -> list[dict[str, Any]]:
        path = self.dir / "logs" / f"{NS}.waypoint.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for line in lines if line.startswith("{") and "response_code" in (e := json.loads(line))]

    def direct_to_reviews(self) -> int:
        """Connections from sleep that reviews' node agents took in without a waypoint between."""
        return sum(1 for node in ("node-1", "node-2") for e in self.access_log(node)
                   if e.get("direction") == "inbound" and e.get("source_workload") == "sleep"
                   and str(e.get("destination_workload", "")).startswith("reviews"))

    def waypoint_running(self) -> bool:
        return any(p["name"] == f"waypoint {NS}/waypoint" for p in self.status()["processes"])


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[Lifecycle]:
    m = Lifecycle(CLUSTER, meshctl)
    m.tools = pod_files("wpops-tools")
    (m.tools / "load.py").write_text(LOAD)
    path = cluster_file(tmp_path_factory.mktemp("wpops"), CLUSTER)
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")

        def served() -> bool:
            """the sleep pod reaches reviews in the mesh"""
            return '"service": "reviews"' in m.curl(NS, "sleep", "http://reviews:9080/reviews/0").stdout

        eventually(served, timeout=60, interval=0.5)
        yield m
    finally:
        meshctl("cluster", "down", CLUSTER, check=False)


def test_waypoint_in_a_missing_namespace_is_refused(mesh: Lifecycle) -> None:
    out = mesh.ctl("waypoint", "apply", "-n", "nosuchns", check=False)
    assert out.returncode == 1 and out.stderr == 'meshctl: namespaces "nosuchns" not found\n', out
    assert mesh.ctl("get", "gateway", "-A").stdout.strip() == ""  # so the controller starts nothing


def test_apply_and_delete_under_load_fail_no_request(mesh: Lifecycle) -> None:
    stop = mesh.tools / "stop"
    stop.unlink(missing_ok=True)
    spec = {"host": "reviews", "port": 9080, "path": "/reviews/0", "rate": 50, "timeout": 10, "stop": str(stop)}
    load = mesh.meshctl.popen("exec", "--cluster", CLUSTER, "-n", NS, "sleep", "--", sys.executable,
                              str(mesh.tools / "load.py"), json.dumps(spec))
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "started"

        applied = mesh.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace", "--drain-seconds", "3")
        assert applied.stdout.splitlines() == [f"waypoint {NS}/waypoint applied", f"waypoint {NS}/waypoint is ready",
                                               f'namespace {NS} labeled with "istio.io/use-waypoint: waypoint"']
        status = mesh.ctl("waypoint", "status", "-n", NS).stdout.splitlines()
        assert status[1].split()[:4] == [NS, "waypoint", "1/1", "Ready"] and status[1].endswith("Namespace bookinfo")

        def through_waypoint() -> bool:
            """the load's requests are carried by the waypoint"""
            return sum(1 for e in mesh.waypoint_log() if e.get("authority") == "reviews:9080") >= 50

        eventually(through_waypoint, timeout=60, interval=0.5)

        deleted = mesh.ctl("waypoint", "delete", "-n", NS, "--timeout", "60")
        assert deleted.stdout.splitlines() == [f"namespace {NS} label istio.io/use-waypoint removed",
                                               "node agents have the change", f"waypoint {NS}/waypoint deleted",
                                               "waypoint pods drained and stopped"]
        assert not mesh.waypoint_running()
        direct = mesh.direct_to_reviews()

        def direct_again() -> bool:
            """the load goes on, straight from sleep to reviews"""
            return mesh.direct_to_reviews() >= direct + 20

        eventually(direct_again, timeout=30, interval=0.5)
    finally:
        stop.touch()
        out, _ = load.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["failed"] == 0 and result["status"] == {"200": result["ok"]}, result
    assert result["ok"] == result["sent"] and result["sent"] >= 200, result
