"""The cluster file's validation: every bad case refused with its location, before anything is built."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from localcluster import spec
from localcluster.spec import ClusterFileError

BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo" / "cluster.yaml"

CLUSTER = """\
apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata: {name: t}
spec:
  nodes:
  - {name: node-1, podCIDR: 10.244.1.0/24}
  - {name: node-2, podCIDR: 10.244.2.0/24}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo}
"""

POD = """\
---
apiVersion: v1
kind: Pod
metadata: {name: %(name)s, namespace: demo, labels: {app: %(name)s}}
spec:
  nodeName: %(node)s
  containers:
  - command: [sleep, infinity]
    ports: [{containerPort: %(port)s}]
"""


def parse(text: str) -> spec.ClusterSpec:
    return spec.parse(text, Path("c.yaml"))


def refused(text: str) -> list[str]:
    with pytest.raises(ClusterFileError) as info:
        parse(text)
    return info.value.problems


def pod(name: str = "a", node: str = "node-1", port: object = 8080) -> str:
    return POD % {"name": name, "node": node, "port": port}


def test_bookinfo_file_is_accepted() -> None:
    s = spec.load(BOOKINFO)
    assert s.name == "bookinfo"
    assert [n.name for n in s.nodes] == ["node-1", "node-2"]
    assert {p.name for p in s.pods if p.namespace == "bookinfo"} == {
        "productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "sleep"}
    assert {p.node for p in s.pods if p.labels.get("app") == "reviews"} == {"node-1", "node-2"}
    assert any(p.namespace == "legacy" and p.name == "sleep" for p in s.pods)
    assert {svc.name for svc in s.services} == {"productpage", "details", "reviews", "ratings"}
    assert all(svc.ports[0].port == 9080 for svc in s.services)
    assert s.warnings == ()


def test_minimal_file() -> None:
    s = parse(CLUSTER + pod())
    assert s.service_cidr == ipaddress.IPv4Network("10.96.0.0/16")
    assert s.pods[0].command == ("sleep", "infinity")
    assert s.pods[0].service_account == "default"


@pytest.mark.parametrize("text, expected", [
    (CLUSTER + pod("a") + pod("a"), "c.yaml:document 4:metadata.name: duplicate Pod demo/a (first in c.yaml:document 3)"),
    (CLUSTER.replace("node-2, podCIDR: 10.244.2.0/24", "node-1, podCIDR: 10.244.2.0/24"),
     "c.yaml:document 1:spec.nodes[1].name: duplicate node name 'node-1'"),
    (CLUSTER.replace("10.244.2.0/24", "10.244.1.128/25"),
     "c.yaml:document 1:spec.nodes[1].podCIDR: 10.244.1.128/25 overlaps spec.nodes[0].podCIDR (10.244.1.0/24)"),
    (CLUSTER.replace("  nodes:", "  serviceCIDR: 10.244.0.0/16\n  nodes:"),
     "c.yaml:document 1:spec.nodes[0].podCIDR: 10.244.1.0/24 overlaps spec.serviceCIDR (10.244.0.0/16)"),
    (CLUSTER.replace("10.244.2.0/24", "10.244.2.0/33"), "c.yaml:document 1:spec.nodes[1].podCIDR: '10.244.2.0/33' is not a valid IPv4 CIDR"),
    (CLUSTER.replace("10.244.2.0/24", "10.244.2.1/24"), "c.yaml:document 1:spec.nodes[1].podCIDR: '10.244.2.1/24' is not a valid IPv4 CIDR"),
    (CLUSTER + pod(node="node-9"), "c.yaml:document 3:spec.nodeName: unknown node 'node-9' (nodes: node-1, node-2)"),
    (CLUSTER + pod().replace("  - command: [sleep, infinity]\n", "  - name: x\n"),
     "c.yaml:document 3:spec.containers[0].command: is required"),
    (CLUSTER + pod(port=70000), "c.yaml:document 3:spec.containers[0].ports[0].containerPort: 70000 is out of range (1-65535)"),
    (CLUSTER + pod(port='"http"'), "c.yaml:document 3:spec.containers[0].ports[0].containerPort: must be an integer"),
    (CLUSTER + pod().replace("nodeName", "nodename"), "c.yaml:document 3:spec.nodename: unknown field"),
    (CLUSTER + pod().replace("namespace: demo", "namespace: nowhere"),
     "c.yaml:document 3:metadata.namespace: namespace 'nowhere' is not defined in this file"),
    (CLUSTER + pod().replace("name: a,", "name: Bad_Name,"), "c.yaml:document 3:metadata.name: 'Bad_Name' is not a valid name"),
    (CLUSTER + pod().replace("spec:\n  nodeName", "spec:\n  serviceAccountName: ghost\n  nodeName"),
     "c.yaml:document 3:spec.serviceAccountName: service account 'ghost' is not defined in namespace 'demo'"),
    (CLUSTER + "---\nkind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}\n",
     "c.yaml:document 3:kind: 'Deployment' is not a kind a cluster file holds"),
    (CLUSTER.replace("kind: Namespace", "kind: Namespace\nspecial: 1"), "c.yaml:document 2:special: unknown field"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n", "c.yaml: no Cluster document"),
    (CLUSTER.replace("name: t}", "name: a-very-long-cluster-name-indeed}"), "c.yaml:document 1:metadata.name: 'a-very-long-cluster-name-indeed' is longer than 20 characters"),
    (CLUSTER + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  ports: [{port: 0}]\n",
     "c.yaml:document 3:spec.ports[0].port: 0 is out of range (1-65535)"),
    (CLUSTER + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  clusterIP: 10.1.0.1\n  ports: [{port: 80}]\n",
     "c.yaml:document 3:spec.clusterIP: 10.1.0.1 is outside the service CIDR 10.96.0.0/16"),
    (CLUSTER + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  ports: [{port: 80}, {port: 80}]\n",
     "c.yaml:document 3:spec.ports[1].port: duplicate service port 80"),
    ("kind: Cluster\n  bad: [indent\n", "c.yaml:line"),
    (CLUSTER + "---\n- a list\n", "c.yaml:document 3: must be a mapping with apiVersion and kind, not a list"),
])
def test_bad_file_is_refused_with_its_location(text: str, expected: str) -> None:
    problems = refused(text)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    problems = refused(CLUSTER + pod("a", node="node-9") + pod("b", port=0))
    assert len(problems) == 2


def test_service_selecting_nothing_is_a_warning() -> None:
    s = parse(CLUSTER + pod() + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\n"
              "spec:\n  selector: {app: nobody}\n  ports: [{port: 80}]\n")
    assert s.warnings == ("c.yaml:document 4: service demo/s selects no pod",)


def test_unreadable_file() -> None:
    with pytest.raises(spec.MeshError, match="cannot read the cluster file"):
        spec.load("/nonexistent/cluster.yaml")


def test_redirect_mode_is_iptables_unless_the_file_says_otherwise() -> None:
    assert {n.redirect_mode for n in parse(CLUSTER).nodes} == {"iptables"}


def test_redirect_mode_for_the_cluster_and_per_node() -> None:
    text = CLUSTER.replace("spec:\n  nodes:", "spec:\n  mesh: {redirectMode: ebpf}\n  nodes:").replace(
        "{name: node-2, podCIDR: 10.244.2.0/24}", "{name: node-2, podCIDR: 10.244.2.0/24, redirectMode: iptables}")
    assert [(n.name, n.redirect_mode) for n in parse(text).nodes] == [("node-1", "ebpf"), ("node-2", "iptables")]


def test_a_bad_redirect_mode_is_refused_with_its_location() -> None:
    text = CLUSTER.replace("{name: node-1, podCIDR: 10.244.1.0/24}",
                           "{name: node-1, podCIDR: 10.244.1.0/24, redirectMode: tproxy}")
    assert refused(text) == ["c.yaml:document 1:spec.nodes[0].redirectMode: 'tproxy' is not a redirect mode "
                             "(one of: iptables, ebpf)"]
    text = CLUSTER.replace("spec:\n  nodes:", "spec:\n  mesh: {redirectMode: 1, dns: true}\n  nodes:")
    assert sorted(refused(text)) == [
        "c.yaml:document 1:spec.mesh.dns: unknown field (allowed: redirectMode)",
        "c.yaml:document 1:spec.mesh.redirectMode: 1 is not a redirect mode (one of: iptables, ebpf)"]


def test_the_command_line_overrides_every_node() -> None:
    s = spec.with_redirect_mode(parse(CLUSTER), "ebpf")
    assert {n.redirect_mode for n in s.nodes} == {"ebpf"}
    with pytest.raises(spec.MeshError, match="'bpf' is not a redirect mode"):
        spec.with_redirect_mode(s, "bpf")
