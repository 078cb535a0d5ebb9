"""The CNI pod source without the plugin: which handed-over pods are desired, how a pod is matched to its
workload, what a restart finds again, what is let go; and the pure parts it relies on (a namespace's
addresses from fib_trie, a pod's cgroup by uid, CNI results)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mesh.proto import discovery_pb2 as pb
from nodeagent.cni import podcgroup, spec
from nodeagent.cni.protocol import PodInfo
from nodeagent.pods import scan
from nodeagent.pods.cni import CniPodSource, HandoverError
from nodeagent.state import WORKLOAD, MeshState

NODE = "node-1"
OWN_NETNS = "/proc/self/ns/net"


def workload(name: str, *, uid: str = "", mesh: bool = True, node: str = NODE, addresses: tuple[str, ...] = (),
             waypoint: bool = False) -> pb.Workload:
    return pb.Workload(uid=uid or f"uid-{name}", name=name, namespace="shop", node=node, service_account="sa",
                       addresses=list(addresses), tunnel_protocol=pb.HBONE if mesh else pb.NONE, is_waypoint=waypoint)


def source(tmp_path: Path, *workloads: pb.Workload) -> CniPodSource:
    state = MeshState()
    state.apply(WORKLOAD, {w.uid: w for w in workloads}, ())
    return CniPodSource(state, NODE, state_dir=tmp_path / "state", netns_dirs=(), proc=str(tmp_path / "no-proc"))


def pod(name: str, *, uid: str | None = None, container: str = "c1", ips: tuple[str, ...] = ("10.244.1.5",)) -> PodInfo:
    return PodInfo(namespace="shop", name=name, uid=f"uid-{name}" if uid is None else uid, container_id=container,
                   ips=ips, netns=OWN_NETNS)


def hand(pods: CniPodSource, info: PodInfo) -> None:
    pods.hand_over(info, os.open(OWN_NETNS, os.O_RDONLY))


def test_desired_is_the_handed_over_pods_discovery_puts_in_the_mesh(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("web-0"), workload("db-0", mesh=False), workload("wp", waypoint=True))
    for name in ("web-0", "db-0", "wp", "stranger"):
        hand(pods, pod(name))
    assert sorted(pods.desired()) == ["uid-web-0"]
    assert sorted(r.name for r in pods.on_node()) == ["db-0", "stranger", "web-0", "wp"]
    ref = pods.desired()["uid-web-0"]
    assert ref.ip == "10.244.1.5" and str(ref.identity) == "spiffe://cluster.local/ns/shop/sa/sa"
    assert pods.desired() == pods.desired()  # stable values: the enroller compares them
    pods.close()


def test_a_pod_is_its_workload_by_uid_or_where_uids_are_names_by_name(tmp_path: Path) -> None:
    # The local cluster's workload uids are <namespace>/<name>; a pod handed over without K8S_POD_UID.
    pods = source(tmp_path, workload("web-0", uid="shop/web-0"), workload("api-0"), workload("sts-0", uid="new-uid"))
    hand(pods, pod("web-0"))
    hand(pods, pod("api-0", uid=""))
    hand(pods, pod("sts-0", uid="old-uid"))  # a StatefulSet pod since recreated under the same name
    assert sorted(pods.desired()) == ["shop/web-0", "uid-api-0"]
    pods.close()


def test_the_address_comes_from_the_plugin_ipv4_first_else_from_discovery(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("a"), workload("b", addresses=("10.244.1.9",)), workload("c"))
    hand(pods, pod("a", ips=("fd00::5", "10.244.1.5")))
    hand(pods, pod("b", ips=()))
    hand(pods, pod("c", ips=()))
    assert {r.name: r.ip for r in pods.desired().values()} == {"a": "10.244.1.5", "b": "10.244.1.9"}
    pods.close()


def test_only_a_network_namespace_can_be_handed_over(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("web-0"))
    fd = os.open(tmp_path, os.O_RDONLY)
    with pytest.raises(HandoverError, match="not a network namespace"):
        pods.hand_over(pod("web-0"), fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the source owned it
    assert pods.handovers() == []
    pods.close()


def test_a_new_sandbox_replaces_the_old_which_the_caller_retires(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("web-0"))
    hand(pods, pod("web-0"))
    (old,) = pods.handovers()
    old.ino -= 1  # as though the first sandbox had had another namespace
    current, replaced = pods.hand_over(pod("web-0", container="c2"), os.open(OWN_NETNS, os.O_RDONLY))
    assert replaced is old and current.pod.container_id == "c2" and current.link != old.link
    assert pods.take(pod("web-0", container="c1")) is None  # a late DEL of the old sandbox
    pods.retire(old)
    assert not os.path.lexists(old.link) and os.path.exists(current.link)
    pods.close()


def test_a_pod_discovery_forgets_is_let_go(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("web-0"))
    hand(pods, pod("web-0"))
    hand(pods, pod("early"))  # discovery has not known it yet: kept
    assert pods.prune() == []
    pods.state.apply(WORKLOAD, {}, ["uid-web-0"])
    assert [h.pod.name for h in pods.prune()] == ["web-0"]
    assert [h.pod.name for h in pods.handovers()] == ["early"]
    pods.close()


def test_the_record_is_found_again_and_what_changed_meanwhile_is_dropped(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("web-0"))
    hand(pods, pod("web-0"))
    hand(pods, pod("db-0"))
    pods.save()
    links = pods.links
    pods.close()
    assert not links.exists()  # the run's private links go with it
    record = tmp_path / "state" / "cni" / "pods.json"
    entries = json.loads(record.read_text())
    entries[1]["ino"] += 1  # db-0's path now holds another namespace
    entries.append({"pod": {**entries[0]["pod"], "name": "gone", "netns": str(tmp_path / "gone")}, "ino": 1})
    record.write_text(json.dumps(entries))

    again = source(tmp_path, workload("web-0"))
    assert again.links != links
    assert again.restore() == 1
    assert [h.pod.name for h in again.handovers()] == ["web-0"] and sorted(again.desired()) == ["uid-web-0"]
    again.close()
    record.write_text("{broken")
    broken = source(tmp_path)
    assert broken.restore() == 0
    broken.close()


def test_missing_pods_are_the_nodes_known_pods_with_addresses_not_handed_over(tmp_path: Path) -> None:
    pods = source(tmp_path, workload("a", addresses=("10.244.1.5",)), workload("b", addresses=("10.244.1.6",), mesh=False),
                  workload("c"), workload("d", addresses=("10.244.2.5",), node="node-2"))
    assert [w.name for w in pods.missing()] == ["a", "b"]
    assert [w.name for w in pods.missing(in_mesh_only=True)] == ["a"]
    hand(pods, pod("a"))
    assert [w.name for w in pods.missing()] == ["b"]
    pods.close()


def test_a_scan_finds_nothing_it_cannot_attribute(tmp_path: Path) -> None:
    # The agent's own namespace is never a candidate, so the test's addresses are not found.
    pods = source(tmp_path, workload("a", addresses=("127.0.0.1",)))
    pods.netns_dirs = ("/proc/self/ns",)
    assert pods.scan() == 0 and pods.handovers() == []
    pods.close()


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.5
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.5
        /32 host LOCAL
"""


def test_a_namespaces_local_addresses_are_read_from_fib_trie() -> None:
    assert scan.local_addresses(FIB_TRIE) == {"10.244.1.5"}


def test_a_pods_cgroup_is_found_by_uid_for_either_cgroup_driver(tmp_path: Path) -> None:
    uid = "0d5f-47a1"
    systemd = tmp_path / "kubepods.slice" / "kubepods-burstable.slice" / "kubepods-burstable-pod0d5f_47a1.slice"
    cgroupfs = tmp_path / "other" / "kubepods" / f"pod{uid}"
    for d in (systemd, cgroupfs, tmp_path / "kubepods.slice" / "kubepods-pod1111.slice"):
        d.mkdir(parents=True)
    assert podcgroup.find(uid, roots=(str(tmp_path),)) == str(systemd)
    assert podcgroup.find(uid, roots=(str(tmp_path / "other"),)) == str(cgroupfs)
    assert podcgroup.find("nope", roots=(str(tmp_path),)) == ""
    assert podcgroup.find(uid, fmt=str(tmp_path / "other" / "kubepods" / "pod{uid}")) == str(cgroupfs)
    assert podcgroup.find(uid, fmt=str(tmp_path / "{namespace}"), namespace="absent") == ""


def test_cni_args_and_results_as_the_spec_writes_them() -> None:
    assert spec.parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop; K8S_POD_NAME=web-0;") == {
        "IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-0"}
    result = {"ips": [{"address": "fd00::5/64"}, {"address": "10.244.1.5/24", "gateway": "10.244.1.1"}]}
    assert spec.result_ips(result) == ("10.244.1.5", "fd00::5")
    assert spec.result_ips({}) == ()
    inv = spec.read_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1"})
    assert (inv.command, inv.netns, inv.is_pod) == ("DEL", "", False)
    assert spec.CniError(7, "bad").result("0.4.0") == {"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": ""}
