"""The local cluster for real: namespaces, veths, bridges, routes, iptables services, names, processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import BOOKINFO, ROOT, Meshctl, cluster_file, leftovers


def curl(meshctl: Meshctl, cluster: str, ns: str, pod: str, url: str) -> dict:
    out = meshctl("exec", "--cluster", cluster, "-n", ns, pod, "--", "curl", "-sS", "-m", "5", "--fail", url)
    return json.loads(out.stdout)


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def status(meshctl: Meshctl, cluster: str) -> dict:
    return json.loads(meshctl("cluster", "status", cluster, "-o", "json").stdout)


def pod_ip(meshctl: Meshctl, cluster: str, ns: str, name: str) -> str:
    return next(p["ip"] for p in status(meshctl, cluster)["plan"]["pods"] if p["namespace"] == ns and p["name"] == name)


def test_cross_node_pod_to_pod(meshctl: Meshctl, bookinfo: str) -> None:
    details = pod_ip(meshctl, bookinfo, "bookinfo", "details-v1")  # on node-2; sleep is on node-1
    answer = curl(meshctl, bookinfo, "bookinfo", "sleep", f"http://{details}:9080/details/7")
    assert answer["pod"] == "details-v1" and answer["node"] == "node-2" and answer["id"] == "7"


def test_cross_node_traffic_crosses_both_node_namespaces(meshctl: Meshctl, bookinfo: str) -> None:
    # The packets of node-1's pods to node-2's pods are forwarded by both nodes: their counters move.
    def forwarded(node: str) -> int:
        out = subprocess.run(["ip", "netns", "exec", f"amb.{bookinfo}.node.{node}", "cat", "/proc/net/snmp"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        names, values = (line.split() for line in out if line.startswith("Ip:"))
        return int(values[names.index("ForwDatagrams")])

    before = forwarded("node-1"), forwarded("node-2")
    test_cross_node_pod_to_pod(meshctl, bookinfo)
    after = forwarded("node-1"), forwarded("node-2")
    assert after[0] > before[0] and after[1] > before[1]


def test_pod_to_service_and_names(meshctl: Meshctl, bookinfo: str) -> None:
    for url in ("http://productpage:9080/productpage", "http://productpage.bookinfo:9080/productpage",
                "http://productpage.bookinfo.svc.cluster.local:9080/productpage"):
        answer = curl(meshctl, bookinfo, "bookinfo", "sleep", url)
        assert answer["pod"] == "productpage-v1" and answer["version"] == "v1"
        assert answer["details"]["pod"] == "details-v1"
        assert "version" in answer["reviews"] and "node" in answer["reviews"]


def test_pod_outside_namespace_reaches_services_by_qualified_name(meshctl: Meshctl, bookinfo: str) -> None:
    answer = curl(meshctl, bookinfo, "legacy", "sleep", "http://ratings.bookinfo:9080/ratings/1")
    assert answer["pod"] == "ratings-v1"
    short = meshctl("exec", "--cluster", bookinfo, "-n", "legacy", "sleep", "--", "curl", "-sS", "-m", "3",
                    "http://ratings:9080/ratings/1", check=False)
    assert short.returncode != 0  # a short name only resolves in the service's own namespace


def test_all_reviews_versions_reached_through_the_service(meshctl: Meshctl, bookinfo: str) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    for _ in range(30):
        answer = curl(meshctl, bookinfo, "bookinfo", "sleep", "http://productpage:9080/productpage")
        reviews = answer["reviews"]
        seen[(reviews["version"], reviews["node"])] += 1
        if reviews["version"] == "v1":
            assert "ratings" not in reviews
        else:
            assert reviews["ratings"]["pod"] == "ratings-v1"
            assert reviews["color"] == ("black" if reviews["version"] == "v2" else "red")
        if len(seen) == 3:
            break
    assert {v for v, _ in seen} == {"v1", "v2", "v3"}
    assert {n for _, n in seen} == {"node-1", "node-2"}


def test_headers_are_passed_downstream(meshctl: Meshctl, bookinfo: str) -> None:
    out = meshctl("exec", "--cluster", bookinfo, "-n", "bookinfo", "sleep", "--", "curl", "-sS", "-m", "5", "-D", "-",
                  "-H", "end-user: jason", "-H", "x-request-id: req-42",
                  "-H", "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                  "http://productpage:9080/productpage")
    assert "x-request-id: req-42" in out.stdout.lower()


def test_pod_reaches_itself_through_its_service(meshctl: Meshctl, bookinfo: str) -> None:
    # ratings has one endpoint, ratings-v1: the connection is DNATed back to its own source.
    answer = curl(meshctl, bookinfo, "bookinfo", "ratings-v1", "http://ratings:9080/ratings/3")
    assert answer["pod"] == "ratings-v1"


def _proc(pid: int, what: str) -> list[str]:
    return Path(f"/proc/{pid}/{what}").read_bytes().decode().split("\0")[:-1]


def _manifest_container(file: str, kind: str, name: str) -> dict:
    doc = next(d for d in yaml.safe_load_all((ROOT / "daemonset" / file).read_text()) if d and d["kind"] == kind)
    return next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _pairs(args: list[str]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(args, args[1:], strict=False) if a.startswith("--") and not b.startswith("--")}


def test_mesh_runs_from_the_daemonset_and_deployment(meshctl: Meshctl, bookinfo: str) -> None:
    """`meshctl get daemonset,deployment` shows one ready agent per node and the control plane, and the
    processes' command lines are the manifests' (daemonset/), with the local cluster's overlay."""
    def workloads() -> dict:
        out = meshctl("get", "daemonset,deployment", "-A", "-o", "json", "--cluster", bookinfo)
        return {i["kind"]: i for i in json.loads(out.stdout)["items"]}

    deadline = time.monotonic() + 30
    while (got := workloads())["DaemonSet"]["status"]["numberReady"] != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    ds, deploy = got["DaemonSet"], got["Deployment"]
    assert (ds["apiVersion"], ds["metadata"]["name"], ds["metadata"]["namespace"]) == \
        ("apps/v1", "ambient-nodeagent", "istio-system")
    assert ds["status"]["desiredNumberScheduled"] == ds["status"]["currentNumberScheduled"] == \
        ds["status"]["numberReady"] == 2
    assert (deploy["metadata"]["name"], deploy["status"]["readyReplicas"], deploy["status"]["replicas"]) == ("istiod", 1, 1)
    table = meshctl("get", "ds,deploy", "-A", "--cluster", bookinfo).stdout.splitlines()
    assert table[1].split() == ["istio-system", "ambient-nodeagent", "2", "2", "2", "2", "2"]
    assert table[4].split() == ["istio-system", "istiod", "1/1", "1", "1"]

    agent = _manifest_container("nodeagent.yaml", "DaemonSet", "nodeagent")
    overlaid = {"--control-plane"}  # the local cluster's own values (localcluster/overlay.py)
    processes = {p["name"]: p["pid"] for p in status(meshctl, bookinfo)["processes"]}
    for node in ("node-1", "node-2"):
        argv, environ = _proc(processes[f"nodeagent {node}"], "cmdline"), _proc(processes[f"nodeagent {node}"], "environ")
        assert argv[1:3] == agent["command"][1:]  # python -m nodeagent.main
        expanded = [a.replace("$(NODE_NAME)", node).replace("$(REDIRECT_MODE)", "iptables") for a in agent["args"]]
        # Every flag of the manifest with a value that is not a path (paths are the node's: below) is there.
        assert {(f, v) for f, v in _pairs(expanded) if not v.startswith("/") and f not in overlaid} <= _pairs(argv)
        assert ("--state-dir", str(meshctl.state_dir / bookinfo / "nodes" / node / "nodeagent")) in _pairs(argv)
        assert ("--token-file", str(meshctl.state_dir / bookinfo / "nodes" / node / "token")) in _pairs(argv)
        assert ("--pod-source", "cni") in _pairs(argv) and ("--bpf-prefix", f"amb-{bookinfo}") in _pairs(argv)
        assert ("--cni-socket", str(meshctl.state_dir / bookinfo / "nodes" / node / "cni.sock")) in _pairs(argv)
        assert {f"NODE_NAME={node}", "REDIRECT_MODE=iptables", f"POD_NAME=ambient-nodeagent-{node}",
                "POD_NAMESPACE=istio-system"} <= set(environ)
    cp = _proc(processes["controlplane"], "cmdline")
    manifest_cp = _manifest_container("controlplane.yaml", "Deployment", "discovery")
    assert cp[1:3] == manifest_cp["command"][1:]
    assert {(f, v) for f, v in _pairs(manifest_cp["args"]) if f != "--config-source" and not v.startswith("/")} \
        <= _pairs(cp)
    assert ("--config-source", "local") in _pairs(cp)


def test_status_logs_and_errors(meshctl: Meshctl, bookinfo: str) -> None:
    text = meshctl("cluster", "status", bookinfo).stdout
    assert "productpage-v1" in text and "Running" in text and "Exited" not in text
    logs = meshctl("logs", "--cluster", bookinfo, "-n", "bookinfo", "productpage-v1").stdout
    assert "listening on :9080" in logs
    missing = meshctl("exec", "--cluster", bookinfo, "-n", "bookinfo", "nosuch", "--", "true", check=False)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "pod bookinfo/nosuch does not exist" in missing.stderr
    again = meshctl("cluster", "up", "-f", str(Path(status(meshctl, bookinfo)["source"])), check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == f"meshctl: cluster '{bookinfo}' is already up: run `meshctl cluster down {bookinfo}` first"


def test_bad_file_is_refused_before_anything_is_built(meshctl: Meshctl, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BOOKINFO.read_text().replace("name: bookinfo\nspec:", "name: t-bad\nspec:", 1)
                    .replace("nodeName: node-2", "nodeName: node-3", 1))
    out = meshctl("cluster", "up", "-f", str(path), check=False)
    assert out.returncode == 1
    assert "document" in out.stderr and "spec.nodeName: unknown node 'node-3'" in out.stderr
    assert "Traceback" not in out.stderr
    assert leftovers("t-bad") == []


def test_without_root_one_clear_line(meshctl: Meshctl) -> None:
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                          os.sys.executable, "-m", "meshctl.main", "cluster", "up", "-f", str(BOOKINFO)],
                         capture_output=True, text=True, env=meshctl.env(), cwd=BOOKINFO.parents[2], check=False)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == ("meshctl: cluster up needs root (network namespaces, veths and iptables): "
                                  "run it with sudo or as root")


def test_two_clusters_coexist_and_a_killed_up_is_recovered(meshctl: Meshctl, bookinfo: str, tmp_path: Path) -> None:
    name = "t-crash"
    path = cluster_file(tmp_path, name)
    try:
        proc = meshctl.popen("cluster", "up", "-f", str(path))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it midway: once some pods' namespaces exist
            made = [x for x in leftovers(name) if x.startswith("netns amb.t-crash.pod.")]
            if len(made) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert leftovers(name), "the killed up should have left something behind to recover from"
        out = meshctl("cluster", "up", "-f", str(path))
        assert "removing what an earlier run of cluster 't-crash' left behind" in out.stdout
        # Both clusters answer, each with its own pods on the same addresses.
        assert curl(meshctl, name, "bookinfo", "sleep", "http://ratings:9080/ratings/1")["pod"] == "ratings-v1"
        assert curl(meshctl, bookinfo, "bookinfo", "sleep", "http://ratings:9080/ratings/1")["pod"] == "ratings-v1"
    finally:
        meshctl("cluster", "down", name, check=False)
    assert leftovers(name) == []
    assert curl(meshctl, bookinfo, "bookinfo", "sleep", "http://details:9080/details/1")["pod"] == "details-v1"


def test_down_leaves_nothing(meshctl: Meshctl, tmp_path: Path) -> None:
    name = "t-down"
    path = cluster_file(tmp_path, name)
    try:
        meshctl("cluster", "up", "-f", str(path))
        assert leftovers(name)
        pids = [p["pid"] for p in status(meshctl, name)["processes"]]
    finally:
        out = meshctl("cluster", "down", name)
    assert "removed" in out.stdout
    assert leftovers(name) == []
    assert not [pid for pid in pids if running(pid)]
    assert not (meshctl.state_dir / name).exists()
    assert meshctl("cluster", "down", name).stdout.strip() == f"cluster '{name}' is not up; nothing to remove"


@pytest.mark.parametrize("args, message", [
    (["exec", "-n", "bookinfo", "sleep"], "meshctl: exec needs a command"),
    (["cluster", "status", "t-none"], "meshctl: cluster 't-none' is not up"),
])
def test_cli_errors_are_one_line(meshctl: Meshctl, args: list[str], message: str) -> None:
    out = meshctl(*args, check=False)
    assert out.returncode == 1 and out.stderr.startswith(message) and out.stderr.count("\n") == 1
