"""Pods of the local cluster wired by CNI plugins: Debian's bridge, host-local and loopback, then the mesh's
ambient-cni, which hands each pod to its node's agent before the pod's command starts.

The cluster: namespace `shop` in the mesh from the start (labelled in the cluster file) with a pod on
node-1, namespace `plain` outside it with a pod on node-2.  Each pod's command first prints the TCP ports
already listening in its network namespace (tests/integration/podtools/listening_at_start.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Meshctl, leftovers
from tests.integration.test_mesh import eventually

PODTOOLS = Path(__file__).resolve().parent / "podtools"
NAME = "t-cni"
AGENT_PORTS = {15001, 15006, 15008}

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
kind: Namespace
metadata: {{name: plain}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, labels: {{app: web}}}}
spec:
  nodeName: node-1
  containers:
  - command: [{sys.executable}, {PODTOOLS / 'listening_at_start.py'}, "8080"]
    ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: plain, labels: {{app: web}}}}
spec:
  nodeName: node-2
  containers:
  - command: [{sys.executable}, {PODTOOLS / 'listening_at_start.py'}, "8080"]
    ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{app: web}}
  ports: [{{port: 8080}}]
"""


@pytest.fixture(scope="module")
def cluster(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cluster's state directory."""
    path = tmp_path_factory.mktemp("cni") / "cluster.yaml"
    path.write_text(CLUSTER)
    try:
        meshctl("cluster", "up", "-f", str(path))
        yield meshctl.state_dir / NAME
    finally:
        meshctl("cluster", "down", NAME, check=False)


def status(meshctl: Meshctl) -> dict:
    return json.loads(meshctl("cluster", "status", NAME, "-o", "json").stdout)


def pod(meshctl: Meshctl, ns: str, name: str = "web") -> dict:
    return next(p for p in status(meshctl)["plan"]["pods"] if (p["namespace"], p["name"]) == (ns, name))


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def cni_adds(home: Path, node: str) -> dict[str, str]:
    """What the node agent answered the plugin's ADDs, by pod."""
    lines = (home / "logs" / f"nodeagent.{node}.log").read_text().splitlines()
    events = [json.loads(line.split(" ", 4)[4]) for line in lines if '"event": "cni add"' in line]
    return {e["pod"]: e["result"] for e in events}


def test_a_pod_of_the_mesh_is_enrolled_before_its_command_starts(cluster: Path) -> None:
    def first_line(ns: str) -> dict:
        return json.loads((cluster / "logs" / f"{ns}.web.log").read_text().splitlines()[0])

    # The agent's listeners were in the pod's namespace when its command started (the ADD had enrolled it).
    assert set(first_line("shop")["listening_at_start"]) >= AGENT_PORTS
    assert not AGENT_PORTS & set(first_line("plain")["listening_at_start"])
    assert cni_adds(cluster, "node-1") == {"shop/web": "enrolled"}
    assert cni_adds(cluster, "node-2") == {"plain/web": "not-in-mesh"}


def test_each_pod_interface_is_made_by_the_bridge_plugin_with_its_planned_address(meshctl: Meshctl, cluster: Path) -> None:
    for ns, node, gateway in (("shop", "node-1", "10.244.1.1"), ("plain", "node-2", "10.244.2.1")):
        p = pod(meshctl, ns)
        node_netns = f"amb.{NAME}.node.{node}"
        # host-local gave the pod its planned address, and holds it for the sandbox the runtime cached.
        held = cluster / "cni" / node / "networks" / "amb-pods" / p["ip"]
        container_id = held.read_text().splitlines()[0]
        cached = json.loads((cluster / "cni" / node / "results" / f"amb-pods-{container_id}-eth0.json").read_text())
        assert cached["netns"] == f"/run/netns/{p['netns']}"
        assert [i["address"] for i in cached["result"]["ips"]] == [f"{p['ip']}/24"]
        assert [pl["type"] for pl in cached["config"]["plugins"]] == ["bridge", "loopback", "ambient-cni"]
        # A veth, whose other end is a hairpin port of the node's cni0, and the default route via the gateway.
        assert "veth" in ip("-n", p["netns"], "-d", "link", "show", "eth0")
        assert f"{p['ip']}/24" in ip("-n", p["netns"], "addr", "show", "eth0")
        assert ip("-n", p["netns"], "route", "show", "default").split()[:3] == ["default", "via", gateway]
        assert "LOOPBACK,UP" in ip("-n", p["netns"], "link", "show", "lo")  # CNI's loopback plugin
        ports = [line for line in ip("-n", node_netns, "-d", "link", "show", "master", "cni0").split("\n") if line]
        assert any(f"link-netns {p['netns']}" in line for line in ports)
        assert "hairpin on" in ip("-n", node_netns, "-d", "link", "show", "master", "cni0")
        assert f"{gateway}/24" in ip("-n", node_netns, "addr", "show", "cni0")


def test_pods_reach_each_other_across_nodes_and_through_the_mesh(meshctl: Meshctl, cluster: Path) -> None:
    shop = pod(meshctl, "shop")
    out = meshctl("exec", "--cluster", NAME, "-n", "plain", "web", "--", "curl", "-sS", "-m", "5", "-o", "/dev/null",
                  "-w", "%{http_code}", "http://web.shop:8080/")
    assert out.stdout == "200"
    lines = (cluster / "logs" / "nodeagent.node-1.log").read_text().splitlines()
    assert any(line.startswith('{"time"') and json.loads(line)["direction"] == "inbound"
               and json.loads(line)["destination_address"].startswith(shop["ip"]) for line in lines)


def test_a_waypoint_pod_is_wired_by_cni_and_deleted_with_del(meshctl: Meshctl, cluster: Path) -> None:
    meshctl("waypoint", "apply", "-n", "shop", "--cluster", NAME)
    try:
        def wired() -> dict | None:
            pods = [p for p in status(meshctl)["plan"]["pods"] if p.get("waypoint")]
            if pods and (cluster / "cni" / pods[0]["node"] / "networks" / "amb-pods" / pods[0]["ip"]).exists():
                return pods[0]
            return None

        wp = eventually(wired, timeout=30)
        assert isinstance(wp, dict)
        assert "veth" in ip("-n", wp["netns"], "-d", "link", "show", "eth0")
        eventually(lambda: cni_adds(cluster, wp["node"]).get("shop/waypoint") == "not-in-mesh", timeout=10)
    finally:
        meshctl("waypoint", "delete", "waypoint", "-n", "shop", "--cluster", NAME)

    def unwired() -> bool:
        results = (cluster / "cni" / wp["node"] / "results").glob("*.json")
        return (not (cluster / "cni" / wp["node"] / "networks" / "amb-pods" / wp["ip"]).exists()
                and f"amb.{NAME}.pod.shop.waypoint" not in ip("netns", "list")
                and not any(json.loads(r.read_text())["netns"].endswith(".waypoint") for r in results))

    eventually(unwired, timeout=30)
    assert '"event": "let go", "pod": "shop/waypoint"' in (cluster / "logs" / f"nodeagent.{wp['node']}.log").read_text()


def test_down_runs_del_and_leaves_nothing(meshctl: Meshctl, cluster: Path) -> None:
    out = meshctl("cluster", "down", NAME)
    assert "2 pod interfaces (CNI DEL)" in out.stdout
    assert leftovers(NAME) == []
    assert not cluster.exists()
