"""`meshctl waypoint apply|delete|list|status` against a real apply API: readiness gates the binding,
typos are refused, deletion unbinds first.  The waypoint pod's readiness is registered here as the
local cluster's controller registers it (`localcluster.waypoints`: a Pod with its `Ready` condition)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from localcluster.waypoints import DRAIN_ANNOTATION, ENGINE_ANNOTATION, WORKERS_ANNOTATION, ready_condition
from mesh.api.client import ApiClient
from mesh.api.validate import Document
from mesh.xds import resources as rs
from meshctl.main import main
from meshctl.waypoint import agents_have_moved_on, pod_ready

NS = "bookinfo"


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    with ApiServer(Store(tmp_path / "store"), tmp_path / "api.sock"):
        client = ApiClient(tmp_path / "api.sock")
        client.apply([Document("t", 1, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})])
        yield str(tmp_path / "api.sock")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def waypoint_pod(ready: bool, name: str = "waypoint") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"gateway.networking.k8s.io/gateway-name": name}},
            "spec": {"nodeName": "node-1", "serviceAccountName": name, "containers": [{"name": "waypoint", "command": ["wp"]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.254", "conditions": [ready_condition(ready)]}}


def register(sock: str, *bodies: dict[str, Any]) -> None:
    ApiClient(sock).apply([Document("controller", i, b) for i, b in enumerate(bodies, start=1)])


def ns_labels(sock: str) -> dict[str, str]:
    return dict(ApiClient(sock).get("Namespace", None, NS)[0]["metadata"].get("labels") or {})


def test_a_waypoint_in_a_missing_namespace_is_refused(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "waypoint", "apply", "-n", "nosuchns", "--socket", sock)
    assert (rc, out, err) == (1, "", 'meshctl: namespaces "nosuchns" not found\n')
    assert ApiClient(sock).get("Gateway") == []
    rc, _, err = run(capsys, "waypoint", "status", "-n", "nosuchns", "--socket", sock)
    assert (rc, err) == (1, 'meshctl: namespaces "nosuchns" not found\n')


def test_apply_binds_only_a_ready_waypoint(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Nobody makes the waypoint ready: the wait ends with a clear error, and the namespace stays unbound.
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--enroll-namespace", "--timeout", "0.3",
                       "--socket", sock)
    assert rc == 1 and out == f"waypoint {NS}/waypoint applied\n"
    assert err == (f"meshctl: timed out after 0.3s waiting for waypoint {NS}/waypoint to be ready (see `meshctl "
                   f"waypoint status -n {NS}` and the waypoint's log)\n")
    assert "istio.io/use-waypoint" not in ns_labels(sock)
    register(sock, waypoint_pod(ready=False))
    rc, out, err = run(capsys, "waypoint", "status", "-n", NS, "--socket", sock)
    assert rc == 1 and out.splitlines()[1].split()[:5] == [NS, "waypoint", "0/1", "NotReady", "waypoint"]
    assert err == "meshctl: 1 waypoint(s) not ready\n"
    rc, out, err = run(capsys, "waypoint", "status", "-n", NS, "--wait", "--timeout", "0.2", "--socket", sock)
    assert (rc, err) == (1, "meshctl: 1 waypoint(s) not ready\n") and "NotReady" in out
    rc, out, _ = run(capsys, "waypoint", "list", "-n", NS, "--socket", sock)
    assert out.splitlines()[0].split() == ["NAMESPACE", "NAME", "TRAFFIC", "TYPE", "READY", "VERSION"]
    assert out.splitlines()[1].split()[:4] == [NS, "waypoint", "service", "0/1"]
    # Ready (as the controller reports it once the waypoint's probe answers): bound.
    register(sock, waypoint_pod(ready=True))
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--enroll-namespace", "--socket", sock)
    assert (rc, err) == (0, "")
    assert out.splitlines() == [f"waypoint {NS}/waypoint applied", f"waypoint {NS}/waypoint is ready",
                                f'namespace {NS} labeled with "istio.io/use-waypoint: waypoint"']
    assert ns_labels(sock)["istio.io/use-waypoint"] == "waypoint"
    rc, out, _ = run(capsys, "waypoint", "status", "-n", NS, "--socket", sock)
    assert rc == 0 and out.splitlines()[1].split() == [NS, "waypoint", "1/1", "Ready", "waypoint", "node-1",
                                                       "10.244.1.254", "-", "-", "Namespace", NS]


def test_no_wait_binds_at_once_and_says_so(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--enroll-namespace", "--no-wait", "--socket", sock)
    assert rc == 0 and ns_labels(sock)["istio.io/use-waypoint"] == "waypoint"
    assert err.startswith(f"warning: binding namespace {NS} without waiting for the waypoint")


def test_drain_time_is_written_on_the_gateway(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = run(capsys, "waypoint", "apply", "-n", NS, "--no-wait", "--drain-seconds", "7.5", "--socket", sock)
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert rc == 0 and gateway["spec"]["infrastructure"]["annotations"] == {DRAIN_ANNOTATION: "7.5"}
    rc, _, err = run(capsys, "waypoint", "apply", "-n", NS, "--drain-seconds", "301", "--socket", sock)
    assert (rc, err) == (1, "meshctl: --drain-seconds: at most 300\n")
    for bad in ("soon", "-1"):
        with pytest.raises(SystemExit) as info:
            main(["waypoint", "apply", "-n", NS, "--drain-seconds", bad, "--socket", sock])
        assert info.value.code == 2
        assert "--drain-seconds" in capsys.readouterr().err


def test_a_changed_worker_count_waits_for_the_rolled_pod(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """On a running waypoint, `apply --workers` is done when a Ready pod runs with the new flags (the
    controller's rolled pod), not when the old one still is."""
    old = waypoint_pod(ready=True)
    old["spec"]["containers"][0]["command"] = ["wp", "--drain-seconds", "5", "--workers", "1"]
    register(sock, old)
    rc, out, _ = run(capsys, "waypoint", "apply", "-n", NS, "--socket", sock)
    assert rc == 0 and out.splitlines()[-1] == f"waypoint {NS}/waypoint is ready"
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--workers", "2", "--timeout", "0.3", "--socket", sock)
    assert rc == 1 and err.startswith(f"meshctl: timed out after 0.3s waiting for waypoint {NS}/waypoint to be ready")
    assert ApiClient(sock).get("Gateway", NS, "waypoint")[0]["spec"]["infrastructure"]["annotations"] == \
        {WORKERS_ANNOTATION: "2"}
    new = waypoint_pod(ready=False, name="waypoint-abcde")
    new["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] = "waypoint"
    new["spec"]["containers"][0]["command"] = ["wp", "--drain-seconds", "5", "--workers", "2"]
    register(sock, new)
    rc, _, _ = run(capsys, "waypoint", "apply", "-n", NS, "--workers", "2", "--timeout", "0.3", "--socket", sock)
    assert rc == 1  # the new pod is not Ready yet
    new["status"]["conditions"] = [ready_condition(True)]
    old["status"]["conditions"] = [ready_condition(False)]  # retired: draining
    register(sock, new, old)
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--workers", "2", "--timeout", "5", "--socket", sock)
    assert (rc, err) == (0, "") and out.splitlines()[-1] == f"waypoint {NS}/waypoint is ready"
    rc, out, _ = run(capsys, "waypoint", "status", "-n", NS, "--socket", sock)
    assert rc == 0 and out.splitlines()[1].split()[:8] == [NS, "waypoint", "1/2", "Ready", "waypoint-abcde", "node-1",
                                                           "10.244.1.254", "2"]
    # The old flags asked for again: the wait is for a pod running them.
    rc, _, _ = run(capsys, "waypoint", "apply", "-n", NS, "--workers", "1", "--timeout", "0.3", "--socket", sock)
    assert rc == 1


def test_bad_worker_counts_are_refused(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "waypoint", "apply", "-n", NS, "--workers", "0", "--socket", sock)
    assert (rc, err) == (1, "meshctl: --workers 0: give a number of processes from 1 to 8\n")
    rc, _, err = run(capsys, "waypoint", "apply", "-n", NS, "--workers", "9", "--socket", sock)
    assert (rc, err) == (1, "meshctl: --workers 9: give a number of processes from 1 to 8\n")
    with pytest.raises(SystemExit) as info:
        main(["waypoint", "apply", "-n", NS, "--workers", "two", "--socket", sock])
    assert info.value.code == 2 and "--workers" in capsys.readouterr().err
    assert ApiClient(sock).get("Gateway") == []  # nothing written


def test_delete_unbinds_before_it_deletes(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    register(sock, waypoint_pod(ready=True))
    run(capsys, "waypoint", "apply", "-n", NS, "--enroll-namespace", "--socket", sock)
    rc, out, _ = run(capsys, "waypoint", "delete", "-n", NS, "--no-wait", "--socket", sock)
    assert rc == 0 and out.splitlines() == [f"namespace {NS} label istio.io/use-waypoint removed",
                                            f"waypoint {NS}/waypoint deleted"]
    assert "istio.io/use-waypoint" not in ns_labels(sock) and ApiClient(sock).get("Gateway") == []


def test_delete_that_cannot_see_the_agents_changes_nothing(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A namespace whose services follow its label: the agents must be seen to move on, and here no
    control plane answers for them (no debug socket), so nothing is changed."""
    register(sock, waypoint_pod(ready=True),
             {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": NS},
              "spec": {"selector": {"app": "reviews"}, "ports": [{"port": 9080}]}})
    run(capsys, "waypoint", "apply", "-n", NS, "--enroll-namespace", "--socket", sock)
    rc, out, err = run(capsys, "waypoint", "delete", "-n", NS, "--socket", sock)
    assert rc == 1 and out == ""
    assert err.startswith("meshctl: cannot read the node agents' sync state at ")
    assert ns_labels(sock)["istio.io/use-waypoint"] == "waypoint" and len(ApiClient(sock).get("Gateway")) == 1


def test_agents_have_moved_on() -> None:
    agent = {"role": "nodeagent", "types": {rs.SERVICE: {"acked_version": "b"}}}
    waypoint = {"role": "waypoint", "types": {rs.SERVICE: {"pending": True}}}
    assert not agents_have_moved_on({"version": "a", "clients": [agent]}, before="a")  # not yet published
    assert agents_have_moved_on({"version": "b", "clients": [agent, waypoint]}, before="a")
    pending = {**agent, "types": {rs.SERVICE: {"pending": True}}}
    assert not agents_have_moved_on({"version": "b", "clients": [agent, pending]}, before="a")
    nacked = {**agent, "types": {rs.SERVICE: {"nack": {"error": "x"}}}}
    assert not agents_have_moved_on({"version": "b", "clients": [nacked]}, before="a")


def test_pod_readiness_is_the_kubelets() -> None:
    assert pod_ready(waypoint_pod(True)) and not pod_ready(waypoint_pod(False))
    no_conditions = waypoint_pod(True)
    del no_conditions["status"]["conditions"]
    assert pod_ready(no_conditions)
    assert not pod_ready({**no_conditions, "status": {"phase": "Pending", "podIP": "10.0.0.1"}})


def test_workers_are_written_on_the_gateway(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--workers N` goes on the Gateway's annotations beside the drain time; out of range is refused and
    writes nothing."""
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--workers", "2", "--drain-seconds", "3",
                 "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert gateway["spec"]["infrastructure"]["annotations"] == {WORKERS_ANNOTATION: "2", DRAIN_ANNOTATION: "3"}
    capsys.readouterr()
    for bad in ("0", "9", "-1"):
        assert main(["waypoint", "apply", "-n", NS, "--name", "other", "--no-wait", "--workers", bad,
                     "--socket", sock]) == 1
        assert capsys.readouterr().err == f"meshctl: --workers {bad}: give a number of processes from 1 to 8\n"
    assert [g["metadata"]["name"] for g in ApiClient(sock).get("Gateway", NS)] == ["waypoint"]


def test_apply_keeps_what_it_is_not_given(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A second `apply` changes what it is given and keeps the rest: an earlier `--workers`, and the
    labels and annotations an operator put on the Gateway."""
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--workers", "2", "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    gateway["metadata"]["annotations"] = {"team": "payments"}
    gateway["metadata"]["labels"]["tier"] = "edge"
    gateway["spec"]["infrastructure"]["labels"] = {"cost-center": "42"}
    register(sock, gateway)
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--drain-seconds", "3", "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert gateway["spec"]["infrastructure"] == {"annotations": {WORKERS_ANNOTATION: "2", DRAIN_ANNOTATION: "3"},
                                                 "labels": {"cost-center": "42"}}
    assert gateway["metadata"]["annotations"] == {"team": "payments"}
    assert gateway["metadata"]["labels"] == {"istio.io/waypoint-for": "service", "tier": "edge"}
    # What is given wins: the traffic type and the worker count.
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--for", "all", "--workers", "1", "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert gateway["metadata"]["labels"] == {"istio.io/waypoint-for": "all", "tier": "edge"}
    assert gateway["spec"]["infrastructure"]["annotations"] == {WORKERS_ANNOTATION: "1", DRAIN_ANNOTATION: "3"}


def test_the_engine_is_written_on_the_gateway_and_kept(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--engine` goes on the Gateway's annotations beside the others; a later `apply` without it keeps it,
    one with it changes it."""
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--engine", "trio", "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert gateway["spec"]["infrastructure"]["annotations"] == {ENGINE_ANNOTATION: "trio"}
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--workers", "2", "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert gateway["spec"]["infrastructure"]["annotations"] == {ENGINE_ANNOTATION: "trio", WORKERS_ANNOTATION: "2"}
    assert main(["waypoint", "apply", "-n", NS, "--no-wait", "--engine", "uvloop", "--socket", sock]) == 0
    gateway = ApiClient(sock).get("Gateway", NS, "waypoint")[0]
    assert gateway["spec"]["infrastructure"]["annotations"] == {ENGINE_ANNOTATION: "uvloop", WORKERS_ANNOTATION: "2"}


def test_bad_engines_are_refused(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("epoll", "Trio", ""):
        rc, _, err = run(capsys, "waypoint", "apply", "-n", NS, "--no-wait", "--engine", bad, "--socket", sock)
        assert (rc, err) == (1, f"meshctl: --engine {bad}: give one of uvloop, trio\n")
    assert ApiClient(sock).get("Gateway") == []  # nothing written


def test_a_changed_engine_waits_for_the_rolled_pod(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    """On a running waypoint, `apply --engine` is done when a Ready pod runs with the new engine; status
    shows the engine of the pod it shows."""
    old = waypoint_pod(ready=True)
    old["spec"]["containers"][0]["command"] = ["wp", "--drain-seconds", "5", "--workers", "1", "--engine", "uvloop"]
    register(sock, old)
    rc, out, _ = run(capsys, "waypoint", "apply", "-n", NS, "--socket", sock)
    assert rc == 0 and out.splitlines()[-1] == f"waypoint {NS}/waypoint is ready"
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--engine", "trio", "--timeout", "0.3", "--socket", sock)
    assert rc == 1 and err.startswith(f"meshctl: timed out after 0.3s waiting for waypoint {NS}/waypoint to be ready")
    new = waypoint_pod(ready=True, name="waypoint-abcde")
    new["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] = "waypoint"
    new["spec"]["containers"][0]["command"] = ["wp", "--drain-seconds", "5", "--workers", "1", "--engine", "trio"]
    old["status"]["conditions"] = [ready_condition(False)]  # retired: draining
    register(sock, new, old)
    rc, out, err = run(capsys, "waypoint", "apply", "-n", NS, "--engine", "trio", "--timeout", "5", "--socket", sock)
    assert (rc, err) == (0, "") and out.splitlines()[-1] == f"waypoint {NS}/waypoint is ready"
    rc, out, _ = run(capsys, "waypoint", "status", "-n", NS, "--socket", sock)
    header, row = out.splitlines()[0].split(), out.splitlines()[1].split()
    assert rc == 0 and header[7:9] == ["WORKERS", "ENGINE"] and row[4] == "waypoint-abcde" and row[7:9] == ["1", "trio"]
