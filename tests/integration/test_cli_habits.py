"""meshctl's Istio habits against a running cluster (`t-cli`, bookinfo, one per module): the logs of every
component (`meshctl logs nodeagent/NODE`, controlplane, controller, a waypoint as a pod), their log
levels switched while they run (the admin `/logging`), `meshctl version` (what runs), and the current
cluster (`cluster list` with its `*`, `cluster use`)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator

import pytest

from examples.bookinfo import demo
from tests.integration.conftest import ROOT, Meshctl, cluster_file
from tests.integration.test_mesh import eventually

NAME = "t-cli"
NS = "bookinfo"
APP_PODS = ("productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "sleep")
GATEWAY = f"""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: {NS}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""


@pytest.fixture(scope="module")
def cluster(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = cluster_file(tmp_path_factory.mktemp("cli"), NAME)
    try:
        out = meshctl("cluster", "up", "-f", str(path), "--no-prometheus")
        assert f"current cluster: {NAME}" in out.stdout
        yield NAME
    finally:
        meshctl("cluster", "down", NAME, check=False)


@pytest.fixture(scope="module")
def waypoint(meshctl: Meshctl, cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A waypoint for bookinfo, made by the cluster's controller from a Gateway; removed afterwards."""
    path = tmp_path_factory.mktemp("gw") / "gateway.yaml"
    path.write_text(GATEWAY)
    meshctl("apply", "-f", str(path), "--cluster", cluster)
    try:
        eventually(lambda: meshctl("logs", "-n", NS, "waypoint", "--cluster", cluster, check=False).returncode == 0,
                   timeout=30)
        yield "waypoint"
    finally:
        meshctl("delete", "-f", str(path), "--cluster", cluster, "--ignore-not-found", check=False)


def test_logs_of_every_component(meshctl: Meshctl, cluster: str, waypoint: str) -> None:
    agent = meshctl("logs", "nodeagent/node-1", "--cluster", cluster).stdout
    assert '{"event": "capture", "mode": "iptables"}' in agent
    assert meshctl("logs", "-n", "istio-system", "ds/ambient-nodeagent").stderr.startswith("Found 2 pods")
    assert "apply API endpoint listening" in meshctl("logs", "controlplane").stdout
    assert '"event": "controller started"' in meshctl("logs", "controller").stdout
    assert '"event": "waypoint started"' in meshctl("logs", "controller").stdout
    assert meshctl("logs", "-n", NS, waypoint, "--since", "5m").stdout.strip()
    tail = meshctl("logs", "controlplane", "--tail", "3").stdout
    assert len(tail.splitlines()) == 3
    for line in tail.splitlines():  # the one format: DATE TIME LEVEL LOGGER MESSAGE
        date, clock, level, logger, _ = line.split(" ", 4)
        assert level in ("DEBUG", "INFO", "WARNING", "ERROR") and logger
    missing = meshctl("logs", "nodeagent/node-9", check=False)
    assert missing.returncode == 1 and "has no node 'node-9'" in missing.stderr


def test_follow_prints_what_is_written_meanwhile(meshctl: Meshctl, cluster: str) -> None:
    follower = meshctl.popen("logs", "nodeagent/node-2", "-f", "--tail", "1")
    try:
        assert follower.stdout is not None

        def next_line() -> str:
            ready, _, _ = select.select([follower.stdout], [], [], 20)
            assert ready, "meshctl logs -f printed nothing in 20s"
            return follower.stdout.readline() if follower.stdout else ""

        next_line()  # the last line so far: it is following now
        meshctl("agent", "log-level", "node-2", "info")  # the agent logs the change
        assert '"event": "log levels changed"' in next_line()
    finally:
        follower.kill()
        follower.wait()


def test_log_level_switch(meshctl: Meshctl, cluster: str, waypoint: str) -> None:
    try:
        out = meshctl("agent", "log-level", "node-1", "warning,nodeagent.proxy=debug").stdout
        assert out == "log level of the node agent on node-1: warning (nodeagent.proxy=debug)\n"
        assert meshctl("agent", "log-level", "node-1").stdout == out
        bad = meshctl("agent", "log-level", "node-1", "loud", check=False)
        assert bad.returncode == 1 and "unknown log level 'loud'" in bad.stderr
        assert meshctl("log-level", "nodeagent/node-1").stdout == out
        wp = meshctl("log-level", "-n", NS, waypoint, "debug").stdout
        assert wp == f"log level of the waypoint {NS}/{waypoint}: debug\n"
        log = meshctl("logs", "-n", NS, waypoint, "--tail", "20").stdout
        assert '"event": "log levels changed", "levels": {"": "debug"}' in log
    finally:
        meshctl("agent", "log-level", "node-1", "--reset", check=False)
        meshctl("log-level", "-n", NS, waypoint, "--reset", check=False)
    assert meshctl("agent", "log-level", "node-1").stdout == "log level of the node agent on node-1: info\n"


def test_version_lists_what_runs(meshctl: Meshctl, cluster: str, waypoint: str) -> None:
    out = meshctl("version", "-o", "json")
    data = json.loads(out.stdout)
    mine = data["client"]["version"]
    rows = {(c["component"], c["name"]): c for c in data["components"]}
    assert set(rows) == {("control plane", "istiod"), ("node agent", "node-1"), ("node agent", "node-2"),
                         ("waypoint", f"{NS}/{waypoint}")}
    assert all(c["version"] == mine and c["pid"] > 0 and "error" not in c for c in rows.values())
    status = json.loads(meshctl("cluster", "status", "-o", "json").stdout)
    pids = {p["name"]: p["pid"] for p in status["processes"]}
    assert rows[("node agent", "node-1")]["pid"] == pids["nodeagent node-1"]
    table = meshctl("version").stdout.splitlines()
    assert table[0] == f"client version: {mine}" and table[2].split() == ["COMPONENT", "NAME", "VERSION", "PID",
                                                                         "STARTED", "STATUS"]


def test_current_cluster(meshctl: Meshctl, cluster: str) -> None:
    listed = meshctl("cluster", "list").stdout.splitlines()
    assert [line.split() for line in listed if NAME in line] == [["*", NAME, "up"]]
    assert meshctl("cluster", "use", NAME).stdout == f"current cluster: {NAME}\n"
    pods = meshctl("get", "pods", "-n", NS, "-o", "name").stdout  # no --cluster: the current one
    assert "pod/productpage-v1" in pods
    other = meshctl("get", "pods", "--cluster", "t-nope", check=False)
    assert other.returncode == 1 and "cluster 't-nope' is not up" in other.stderr


def test_status_accepts_cluster_flag(meshctl: Meshctl, cluster: str) -> None:
    by_flag = meshctl("cluster", "status", "--cluster", cluster).stdout
    by_name = meshctl("cluster", "status", cluster).stdout
    assert by_flag.splitlines()[0] == by_name.splitlines()[0] and cluster in by_flag.splitlines()[0]


def test_pods_answer_without_the_apps_own_delay(meshctl: Meshctl, cluster: str) -> None:
    """Kept-alive requests to productpage from the sleep pod, outside the mesh and then in it: measured and
    printed for the record (timing is never asserted), and every answer must be a 200."""
    script = ("import http.client,time,statistics;c=http.client.HTTPConnection('productpage',9080);l=[]\n"
              "for i in range(60):\n t=time.perf_counter();c.request('GET','/productpage');r=c.getresponse();"
              "b=r.read();assert r.status==200,b;l.append((time.perf_counter()-t)*1000)\n"
              "print(f'{statistics.median(l[10:]):.2f}')")

    def median() -> float:
        return float(meshctl("exec", "-n", NS, "sleep", "--", sys.executable, "-c", script).stdout)

    plain = median()
    meshctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
    try:
        def enrolled() -> bool:
            """every bookinfo pod is enrolled by its node's agent"""
            states = {w["name"]: w.get("enrollment") for node in ("node-1", "node-2")
                      for w in json.loads(meshctl("agent", "workloads", node, "-o", "json").stdout)["workloads"]
                      if w.get("local") and w.get("namespace") == NS}
            return all(states.get(pod) == "enrolled" for pod in APP_PODS)

        eventually(enrolled, timeout=30)
        meshed = median()
        # The chain the sleep pod's agent holds, checked against the mesh root as `meshctl ca check` does.
        pods = json.loads(meshctl("get", "pods", "-n", NS, "-o", "json").stdout)["items"]
        node = next(p["spec"]["nodeName"] for p in pods if p["metadata"]["name"] == "sleep")
        chain = meshctl("agent", "certs", node, "--chain", f"{NS}/sleep").stdout
        assert chain.startswith("-----BEGIN CERTIFICATE-----")
        check = subprocess.run([sys.executable, "-m", "meshctl.main", "ca", "check", "-"], input=chain, text=True,
                               capture_output=True, env=meshctl.env(), cwd=ROOT, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"spiffe://cluster.local/ns/{NS}/sa/sleep" in check.stdout
        # ztunnel-config's other views: the services the agent knows, the connections it carried.
        services = meshctl("agent", "services", node).stdout.splitlines()
        assert any(line.split()[:2] == [NS, "productpage"] for line in services)
        rows = json.loads(meshctl("agent", "connections", node, "-o", "json").stdout)
        out = [r for r in rows if r["reporter"] == "source" and r["source"] == f"{NS}/sleep"
               and r["destination"].startswith(f"{NS}/productpage")]
        assert out and out[0]["opened"] >= 1 and out[0]["sent_bytes"] > 0
    finally:
        meshctl("label", "namespace", NS, "istio.io/dataplane-mode-", check=False)
    print(f"\nproductpage keep-alive median, 50 requests: {plain:.2f} ms without the mesh, {meshed:.2f} ms in it")
    assert plain > 0 and meshed > 0


def test_demo_l7_step_splits_reviews_at_the_waypoint(meshctl: Meshctl, cluster: str, waypoint: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo`'s L7 step, run as the demo runs it (examples/bookinfo/demo.py), on this cluster: the
    samples' waypoint, subsets and 70/30 VirtualService; reviews answered by v1 and v3 only."""
    monkeypatch.setenv("MESH_STATE_DIR", str(meshctl.state_dir))
    meshctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
    try:
        versions, failed = demo.l7_step(cluster)
    finally:
        meshctl("label", "namespace", NS, "istio.io/use-waypoint-", check=False)
        for sample in ("networking/virtual-service-reviews-v1-v3.yaml", "networking/destination-rule-all.yaml"):
            meshctl("delete", "-f", str(demo.SAMPLES / sample), "--ignore-not-found", check=False)
        meshctl("label", "namespace", NS, "istio.io/dataplane-mode-", check=False)
    assert failed == 0
    # 60 calls at 70/30: each version answers some (missing one by chance: 0.7**60 or 0.3**60), v2 none.
    assert set(versions) == {"v1", "v3"} and sum(versions.values()) == demo.SPLIT_CALLS
