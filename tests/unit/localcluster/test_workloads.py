"""`meshctl get daemonset,deployment`: Kubernetes-shaped objects from the cluster record, the processes'
liveness and their readiness probes."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import components, overlay, processes, state, workloads
from localcluster.kubelet import Probe
from localcluster.workloads import PodState, workload_object
from meshctl.main import main


def entry(kind: str, pods: list[str], replicas: int | None = None) -> dict:
    ref = overlay.NODE_AGENT if kind == "DaemonSet" else overlay.CONTROL_PLANE
    workload = components.load_workloads().node_agent if kind == "DaemonSet" else \
        components.load_workloads().control_plane
    record = components.workload_record(workload, ref, [{"name": p, "process": f"proc {p}", "netns": "", "ip": "",
                                                         "node": "", "readiness": None} for p in pods])
    if replicas is not None:
        record["manifest"]["spec"]["replicas"] = replicas
    return record


def test_daemonset_status() -> None:
    e = entry("DaemonSet", ["a", "b", "c"])
    obj = workload_object(e, {"a": PodState(True, True), "b": PodState(True, False), "c": PodState(False, False)},
                          "2024-01-01T00:00:00Z")
    assert (obj["apiVersion"], obj["kind"]) == ("apps/v1", "DaemonSet")
    assert obj["metadata"]["name"] == "ambient-nodeagent" and obj["metadata"]["namespace"] == "istio-system"
    assert obj["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
    assert obj["spec"] == e["manifest"]["spec"]  # as in the manifest
    assert obj["status"] == {"desiredNumberScheduled": 3, "currentNumberScheduled": 2, "numberReady": 1,
                             "numberAvailable": 1, "numberUnavailable": 2, "updatedNumberScheduled": 2,
                             "numberMisscheduled": 0, "observedGeneration": 1}


def test_deployment_status() -> None:
    ready = workload_object(entry("Deployment", ["p"]), {"p": PodState(True, True)})
    assert ready["status"]["replicas"] == ready["status"]["readyReplicas"] == ready["status"]["availableReplicas"] == 1
    assert ready["status"]["conditions"][0] == {"type": "Available", "status": "True",
                                                "reason": "MinimumReplicasAvailable"}
    starting = workload_object(entry("Deployment", ["p"]), {"p": PodState(True, False)})
    assert (starting["status"]["replicas"], starting["status"]["readyReplicas"]) == (1, 0)
    assert starting["status"]["unavailableReplicas"] == 1
    assert starting["status"]["conditions"][0]["status"] == "False"


@pytest.mark.parametrize("text, kind", [("ds", "DaemonSet"), ("daemonsets", "DaemonSet"), ("DaemonSet", "DaemonSet"),
                                        ("daemonset.apps", "DaemonSet"), ("deploy", "Deployment"),
                                        ("deployments", "Deployment"), ("pods", None)])
def test_kind_names(text: str, kind: str | None) -> None:
    assert workloads.resolve_kind(text) == kind


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: int) -> str:
    """A cluster record whose pods are this process: node-1's agent ready (its TCP probe answers),
    node-2's not (nothing listens), the control plane ready (no probe)."""
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    me = processes.ProcessRecord("self", os.getpid(), processes.start_time(os.getpid()) or 0, "", "")
    probes = {"node-1": Probe("tcp", listening, host="127.0.0.1"), "node-2": Probe("tcp", 1, host="127.0.0.1")}
    ds, deploy = entry("DaemonSet", []), entry("Deployment", [])
    ds["pods"] = [{"name": f"ambient-nodeagent-{n}", "node": n, "ip": "", "netns": "", "process": "self",
                   "readiness": dataclasses.asdict(p)} for n, p in probes.items()]
    deploy["pods"] = [{"name": "istiod-0", "node": "", "ip": "", "netns": "", "process": "self", "readiness": None}]
    state.write_record("t-get", {"name": "t-get", "started": "2024-01-01T00:00:00+00:00",
                                 "processes": [me.to_json()], "workloads": [ds, deploy]})
    return "t-get"


def test_meshctl_get_daemonset_deployment(cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "daemonset,deployment", "-A", "--cluster", cluster]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out] == [
        ["NAMESPACE", "NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE"],
        ["istio-system", "ambient-nodeagent", "2", "2", "1", "2", "1"],
        [],
        ["NAMESPACE", "NAME", "READY", "UP-TO-DATE", "AVAILABLE"],
        ["istio-system", "istiod", "1/1", "1", "1"],
    ]
    assert main(["get", "ds", "-A", "-o", "json", "--cluster", cluster]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["kind"] == "List" and [i["kind"] for i in listed["items"]] == ["DaemonSet"]
    assert listed["items"][0]["status"]["desiredNumberScheduled"] == 2
    assert listed["items"][0]["status"]["numberReady"] == 1
    assert main(["get", "deploy", "istiod", "-n", "istio-system", "-o", "name", "--cluster", cluster]) == 0
    assert capsys.readouterr().out == "deployment.apps/istiod\n"


def test_meshctl_get_in_another_namespace_or_a_missing_name(cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "ds", "--cluster", cluster]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == "No DaemonSet resources found in namespace default.\n"
    assert main(["get", "ds", "nosuch", "-n", "istio-system", "--cluster", cluster]) == 1
    assert capsys.readouterr().err == ("meshctl: daemonset 'nosuch' not found in namespace istio-system in cluster "
                                       "'t-get'\n")
    assert main(["get", "ds,widgets", "--cluster", cluster]) == 1
    assert capsys.readouterr().err.startswith("meshctl: unknown kind 'widgets'")
