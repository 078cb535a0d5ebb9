"""The plan: names, addresses, services and rules, computed without touching the machine."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from controlplane.translate.workloads import workload_uid
from localcluster import plan, spec
from nodeagent.cni.spec import read_config

BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo" / "cluster.yaml"


def bookinfo() -> plan.ClusterPlan:
    return plan.make_plan(spec.load(BOOKINFO))


def test_names_share_the_cluster_prefix() -> None:
    p = bookinfo()
    assert all(name.startswith("amb.bookinfo.") for name in p.all_netns())
    assert len(set(p.all_netns())) == len(p.all_netns())


def test_addresses() -> None:
    p = bookinfo()
    assert p.underlay_gateway == ipaddress.IPv4Address("172.30.0.1")
    assert [str(n.underlay_ip) for n in p.nodes] == ["172.30.0.10", "172.30.0.11"]
    for pod in p.pods:
        node = p.node(pod.node)
        assert pod.ip in node.pod_cidr and pod.ip != node.gateway
    assert len({pod.ip for pod in p.pods}) == len(p.pods)
    assert [str(s.cluster_ip) for s in p.services] == ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"]


def test_service_endpoints_follow_selectors() -> None:
    p = bookinfo()
    reviews = next(s for s in p.services if s.name == "reviews")
    assert {e.pod for e in reviews.ports[0].endpoints} == {"bookinfo/reviews-v1", "bookinfo/reviews-v2",
                                                          "bookinfo/reviews-v3"}


def test_rules_spread_over_endpoints_with_equal_chances() -> None:
    rules = plan.service_rules(bookinfo())
    assert "--probability 0.3333333333" in rules and "--probability 0.5000000000" in rules
    assert rules.count("-j DNAT") == 6
    assert rules.count("COMMIT") == 2


def test_service_without_endpoints_rejects() -> None:
    text = BOOKINFO.read_text().replace("selector:\n    app: ratings", "selector:\n    app: nobody")
    p = plan.make_plan(spec.parse(text, BOOKINFO))
    assert "-d 10.96.0.13/32 -p tcp -m tcp --dport 9080 -m comment --comment \"bookinfo/ratings:9080\" -j REJECT" \
        in plan.service_rules(p)


def test_hosts_file_names_services_three_ways() -> None:
    p = bookinfo()
    legacy_sleep = p.pod("legacy", "sleep")
    assert legacy_sleep is not None
    hosts = plan.hosts_file(p, legacy_sleep)
    assert "10.96.0.10\tproductpage.bookinfo.svc.cluster.local productpage.bookinfo\n" in hosts
    sleep = p.pod("bookinfo", "sleep")
    assert sleep is not None
    assert "10.96.0.10\tproductpage.bookinfo.svc.cluster.local productpage.bookinfo productpage\n" in \
        plan.hosts_file(p, sleep)
    assert plan.resolv_conf(sleep).startswith("search bookinfo.svc.cluster.local svc.cluster.local")


def test_each_pod_has_its_own_cgroup_under_the_clusters() -> None:
    p = plan.make_plan(spec.load(BOOKINFO))
    cgroups = [pod.cgroup for pod in p.pods]
    assert len(set(cgroups)) == len(cgroups)
    assert all(c.startswith(f"{plan.cluster_cgroup(p.name)}/pod.") for c in cgroups)
    assert p.pod("bookinfo", p.pods[0].name) is not None
    assert {n.redirect_mode for n in p.nodes} == {"iptables"}


def test_each_node_has_a_cni_conflist_bridge_host_local_loopback_then_the_mesh_plugin() -> None:
    p = bookinfo()
    node = p.node("node-2")
    conf = plan.cni_conflist(node, agent_socket="/s/nodes/node-2/cni.sock", ipam_dir="/s/cni/node-2/networks",
                             cgroup_format="/cg/amb.bookinfo/pod.{namespace}.{name}")
    assert (conf["cniVersion"], conf["name"]) == ("1.0.0", "amb-pods")
    assert [pl["type"] for pl in conf["plugins"]] == ["bridge", "loopback", "ambient-cni"]
    bridge, _, mesh = conf["plugins"]
    # The node's bridge is the pods' gateway; no masquerading (pods are routed between nodes as before).
    assert bridge["bridge"] == "cni0" and bridge["isGateway"] is True and bridge["ipMasq"] is False
    assert bridge["hairpinMode"] is True
    assert bridge["ipam"] == {"type": "host-local", "dataDir": "/s/cni/node-2/networks",
                              "ranges": [[{"subnet": "10.244.2.0/24", "gateway": "10.244.2.1"}]],
                              "routes": [{"dst": "0.0.0.0/0"}]}
    assert mesh == {"type": "ambient-cni", "agentSocket": "/s/nodes/node-2/cni.sock",
                    "excludeNamespaces": ["kube-system", "istio-system"],
                    "cgroupFormat": "/cg/amb.bookinfo/pod.{namespace}.{name}",
                    "capabilities": {"io.kubernetes.cri.pod-annotations": True}}
    # What the mesh plugin reads of it is a valid configuration for it.
    chained = {"cniVersion": conf["cniVersion"], "name": conf["name"], **mesh, "prevResult": {"cniVersion": "1.0.0"}}
    read = read_config(json.dumps(chained).encode(), "ADD")
    assert read.agent_socket == "/s/nodes/node-2/cni.sock" and read.cgroup_format == mesh["cgroupFormat"]


def test_each_pod_asks_host_local_for_its_planned_address() -> None:
    p = bookinfo()
    pod = p.pod("bookinfo", "details-v1")
    assert pod is not None
    args = dict(plan.pod_cni_args(pod, "c0ffee"))
    assert args == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "bookinfo", "K8S_POD_NAME": "details-v1",
                    "K8S_POD_INFRA_CONTAINER_ID": "c0ffee", "K8S_POD_UID": "bookinfo/details-v1",
                    "IP": str(pod.ip)}
    assert pod.ip in p.node(pod.node).pod_cidr
    # The uid is the one the control plane gives the pod's workload.
    assert args["K8S_POD_UID"] == workload_uid({"metadata": {"namespace": "bookinfo", "name": "details-v1"}})
