"""A mixed cluster: node-1 captures its pods with eBPF, node-2 with iptables, and the mesh works across
them both ways (the capture mode is a node's own business: HBONE between the agents is the same)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Meshctl, cluster_file
from tests.integration.test_mesh import BOOKINFO_PODS, Mesh, eventually


@pytest.fixture(scope="module")
def mixed(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    name = "t-mixed"
    path = cluster_file(tmp_path_factory.mktemp("mixed"), name)
    text = path.read_text().replace("  - name: node-1\n    podCIDR: 10.244.1.0/24\n",
                                    "  - name: node-1\n    podCIDR: 10.244.1.0/24\n    redirectMode: ebpf\n", 1)
    assert "redirectMode: ebpf" in text
    path.write_text(text)
    m = Mesh(name, meshctl, "mixed")
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")

        def all_enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(f"bookinfo/{p}") == "enrolled" for p in BOOKINFO_PODS if p != "echo")

        eventually(all_enrolled, timeout=30)
        yield m
    finally:
        meshctl("cluster", "down", name, check=False)


def test_each_node_captures_in_its_own_mode(mixed: Mesh) -> None:
    for node, mode in (("node-1", "ebpf"), ("node-2", "iptables")):
        assert json.loads(mixed.ctl("agent", "redirect", node, "-o", "json").stdout)["mode"] == mode
        workloads = json.loads(mixed.ctl("agent", "workloads", node, "-o", "json").stdout)["workloads"]
        assert {w.get("capture") for w in workloads if w.get("local") and w["namespace"] == "bookinfo"} == {mode}


def test_traffic_crosses_between_the_modes_both_ways(mixed: Mesh) -> None:
    # sleep and productpage on node-1 (eBPF) call details and ratings on node-2 (iptables), and reviews-v2
    # on node-2 calls ratings; the answers come back the same way.
    for _ in range(6):
        answer = json.loads(mixed.curl("bookinfo", "sleep", "http://productpage:9080/productpage").stdout)
        assert answer["pod"] == "productpage-v1" and answer["details"]["pod"] == "details-v1"
    inbound = [e for node in ("node-1", "node-2") for e in mixed.access_log(node) if e["direction"] == "inbound"]
    assert {e["destination_workload"] for e in inbound if e["connection_security_policy"] == "mutual_tls"} >= {
        "productpage-v1", "details-v1"}
    # node-2 (iptables) to node-1 (eBPF): reviews-v2 is on node-2, sleep of node-2 is outside the mesh,
    # so use details' node: a pod on node-2 calling productpage on node-1.
    out = mixed.exec("bookinfo", "reviews-v2", "curl", "-sS", "-m", "5", "http://productpage:9080/productpage",
                     check=False)
    assert out.returncode == 0 and json.loads(out.stdout)["pod"] == "productpage-v1"
    assert any(e["destination_workload"] == "productpage-v1" and e["connection_security_policy"] == "mutual_tls"
               and e["source_principal"].endswith("/sa/bookinfo-reviews") for e in mixed.access_log("node-1")
               if e["direction"] == "inbound")
