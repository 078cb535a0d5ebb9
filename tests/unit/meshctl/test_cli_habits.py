"""meshctl's Istio habits without a running cluster: `logs` targets and line selection, the current
cluster, one message for verbs that need root (run as an unprivileged user, for real), `version`."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import logs as clogs
from localcluster import state
from meshctl import version
from meshctl.main import main

ROOT = Path(__file__).resolve().parents[3]
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def record(tmp: Path) -> dict[str, Any]:
    """A cluster record as `cluster up` writes it (only the fields `logs` reads), logs under `tmp`."""
    def proc(name: str, log: str) -> dict[str, Any]:
        return {"name": name, "pid": 1, "start_time": 1, "netns": "", "log": str(tmp / log)}

    return {
        "name": "demo",
        "plan": {"nodes": [{"name": "node-1", "netns": "n1"}, {"name": "node-2", "netns": "n2"}],
                 "pods": [{"namespace": "bookinfo", "name": "productpage-v1", "netns": "p1"},
                          {"namespace": "bookinfo", "name": "waypoint", "netns": "w1", "waypoint": True}]},
        "processes": [proc("controlplane", "controlplane.log"), proc("controller", "controller.log"),
                      proc("nodeagent node-1", "nodeagent.node-1.log"), proc("nodeagent node-2", "nodeagent.node-2.log"),
                      proc("pod bookinfo/productpage-v1", "bookinfo.productpage-v1.log"),
                      proc("waypoint bookinfo/waypoint", "bookinfo.waypoint.log")],
        "workloads": [
            {"kind": "DaemonSet", "namespace": "istio-system", "name": "ambient-nodeagent",
             "pods": [{"name": "ambient-nodeagent-node-1", "process": "nodeagent node-1"},
                      {"name": "ambient-nodeagent-node-2", "process": "nodeagent node-2"}]},
            {"kind": "Deployment", "namespace": "istio-system", "name": "istiod",
             "pods": [{"name": "istiod-0", "process": "controlplane"}]},
        ],
    }


@pytest.mark.parametrize(("target", "namespace", "what", "log", "note"), [
    ("nodeagent/node-2", "default", "the node agent of node-2", "nodeagent.node-2.log", ""),
    ("controlplane", "default", "the control plane", "controlplane.log", ""),
    ("controller", "default", "the waypoint controller", "controller.log", ""),
    ("productpage-v1", "bookinfo", "pod bookinfo/productpage-v1", "bookinfo.productpage-v1.log", ""),
    ("waypoint", "bookinfo", "waypoint bookinfo/waypoint", "bookinfo.waypoint.log", ""),
    ("ds/ambient-nodeagent", "default", "pod istio-system/ambient-nodeagent-node-1", "nodeagent.node-1.log",
     "Found 2 pods, using pod/ambient-nodeagent-node-1"),
    ("deploy/istiod", "istio-system", "pod istio-system/istiod-0", "controlplane.log", ""),
    ("istiod-0", "istio-system", "pod istio-system/istiod-0", "controlplane.log", ""),
])
def test_log_targets(tmp_path: Path, target: str, namespace: str, what: str, log: str, note: str) -> None:
    assert clogs.find(record(tmp_path), target, namespace) == clogs.LogSource(what, tmp_path / log, note)


@pytest.mark.parametrize(("target", "namespace", "message"), [
    ("nodeagent", "default", "cluster 'demo' has 2 node agents: say which, one of nodeagent/node-1, nodeagent/node-2"),
    ("nodeagent/node-9", "default", "cluster 'demo' has no node 'node-9' (nodes: node-1, node-2)"),
    ("nodeagent/", "default", "'nodeagent/': name a component"),
    ("sts/web", "default", "'sts/web': unknown kind 'sts'"),
    ("ds/nope", "default", "no DaemonSet 'nope' in namespace 'default' (DaemonSets: istio-system/ambient-nodeagent)"),
    ("details-v1", "bookinfo", "no pod 'details-v1' in namespace 'bookinfo' (pods there: productpage-v1, waypoint)"),
    ("prometheus", "default", "Prometheus has no process in this cluster"),
])
def test_log_targets_refused(tmp_path: Path, target: str, namespace: str, message: str) -> None:
    with pytest.raises(clogs.LogTargetError) as exc:
        clogs.find(record(tmp_path), target, namespace)
    assert str(exc.value).startswith(message)


def test_one_node_cluster_needs_no_node_name(tmp_path: Path) -> None:
    rec = record(tmp_path)
    rec["plan"]["nodes"] = rec["plan"]["nodes"][:1]
    assert clogs.find(rec, "nodeagent", "default").path == tmp_path / "nodeagent.node-1.log"


LOG = (b"2026-05-02 10:00:00,000 INFO a one\n"
       b"2026-05-02 10:05:00,000 ERROR a two\n"
       b"Traceback (most recent call last):\n"
       b"  ValueError: x\n"
       b"2026-05-02 10:06:00,000 INFO a three")


def test_select_since_keeps_continuation_lines_with_their_record() -> None:
    since = datetime.datetime(2026, 5, 2, 10, 4)
    assert clogs.select(LOG, since=since) == LOG.split(b"\n", 1)[1] + b"\n"
    assert clogs.select(LOG, since=datetime.datetime(2026, 5, 2, 11)) == b""


def test_select_tail() -> None:
    assert clogs.select(LOG, tail=2) == b"  ValueError: x\n2026-05-02 10:06:00,000 INFO a three\n"
    assert clogs.select(LOG, tail=0) == b""
    assert clogs.select(LOG, tail=2, since=datetime.datetime(2026, 5, 2, 10, 5, 30)) == \
        b"2026-05-02 10:06:00,000 INFO a three\n"
    assert clogs.select(b"") == b""


def meshctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_record(root: Path, name: str, rec: dict[str, Any]) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / state.RECORD_FILE).write_text(json.dumps(rec))


def test_logs_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv(state.CLUSTER_ENV, raising=False)
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    write_record(tmp_path, "demo", record(logs_dir))
    (logs_dir / "nodeagent.node-1.log").write_bytes(LOG)
    code, out, err = meshctl(capsys, "logs", "nodeagent/node-1", "--tail", "1")
    assert (code, out, err) == (0, "2026-05-02 10:06:00,000 INFO a three\n", "")
    code, out, err = meshctl(capsys, "logs", "ds/ambient-nodeagent", "--since", "1m")  # those lines are old
    assert (code, out, err) == (0, "", "Found 2 pods, using pod/ambient-nodeagent-node-1\n")
    (logs_dir / "bookinfo.productpage-v1.log").write_bytes(b"listening on :9080\n")
    code, out, err = meshctl(capsys, "logs", "-n", "bookinfo", "productpage-v1", "--since", "5m")
    assert code == 0 and out == "" and "has no times in it" in err
    code, _, err = meshctl(capsys, "logs", "controller")
    assert code == 1 and err == f"meshctl: the waypoint controller has written no log yet ({logs_dir}/controller.log " \
                                "does not exist)\n"


@pytest.mark.parametrize("args", [("--tail", "x"), ("--tail", "-1"), ("--since", "soon")])
def test_logs_flags_refused(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["logs", "controlplane", *args])
    assert exc.value.code == 2 and repr(args[1]) in capsys.readouterr().err


def test_current_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv(state.CLUSTER_ENV, raising=False)
    code, out, err = meshctl(capsys, "cluster", "list")
    assert (code, out) == (0, "") and err.startswith("No clusters are up")
    for name in ("one", "two"):
        write_record(tmp_path, name, {"name": name, "phase": "ready", "plan": {"underlay": {"netns": "x"}}})
    with pytest.raises(state.ClusterNotFound, match="several clusters are up .* `meshctl cluster use NAME`"):
        state.find_cluster(None)
    code, out, _ = meshctl(capsys, "cluster", "list")  # both listed, none current
    assert code == 0 and out.splitlines()[1:] == ["         one   incomplete", "         two   incomplete"]
    code, out, _ = meshctl(capsys, "cluster", "use", "two")
    assert (code, out) == (0, "current cluster: two\n")
    assert state.find_cluster(None) == "two" and state.find_cluster("one") == "one"
    code, out, _ = meshctl(capsys, "cluster", "list")
    assert out.splitlines() == ["CURRENT  NAME  STATUS", "         one   incomplete", "*        two   incomplete"]
    monkeypatch.setenv(state.CLUSTER_ENV, "one")  # the environment wins over the current cluster
    assert state.find_cluster(None) == "one"
    code, out, _ = meshctl(capsys, "cluster", "list")
    assert out.splitlines()[1:] == ["*        one   incomplete", "         two   incomplete"]
    monkeypatch.delenv(state.CLUSTER_ENV)
    code, _, err = meshctl(capsys, "cluster", "use", "three")
    assert code == 1 and err == "meshctl: cluster 'three' is not up (clusters up: one, two)\n"
    assert state.current_cluster() == "two"  # unchanged
    shutil.rmtree(tmp_path / "two")  # a current cluster that went away is not used
    assert state.current_cluster() is None and state.find_cluster(None) == "one"


def test_status_takes_a_name_or_cluster_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    code, _, err = meshctl(capsys, "cluster", "status", "a", "--cluster", "b")
    assert code == 1 and err == "meshctl: two clusters named: 'a' and --cluster 'b'\n"
    code, _, err = meshctl(capsys, "cluster", "status", "--cluster", "b")
    assert code == 1 and err == "meshctl: cluster 'b' is not up (clusters up: none)\n"


@pytest.fixture
def shared_state() -> Iterator[Path]:
    """A state root an unprivileged user can read (pytest's own temporary directories are root's only),
    holding one cluster whose directory is root's only, as a real cluster's secrets are."""
    root = Path(tempfile.mkdtemp(prefix="meshctl-state-"))
    root.chmod(0o755)
    write_record(root, "demo", {"name": "demo", "phase": "ready", "plan": {"nodes": [], "pods": [], "underlay": {"netns": "x"}}})
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_nobody(state_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "MESH_STATE_DIR": str(state_root), "HOME": "/"}
    return subprocess.run([*NOBODY, sys.executable, "-m", "meshctl.main", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60, check=False)


REASON = "needs root (the local cluster's sockets, logs and network namespaces belong to root): run it with sudo " \
         "or as root\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
@pytest.mark.parametrize(("args", "verb"), [
    (("get", "pods"), "get"),
    (("apply", "-f", "-"), None),  # reads its input first; an empty one is refused before any socket
    (("proxy-status",), "proxy-status"),
    (("logs", "controlplane"), "logs"),
    (("agent", "workloads", "node-1"), "agent"),
    (("agent", "log-level", "node-1", "debug"), "agent"),
    (("log-level", "nodeagent/node-1"), "log-level"),
    (("version",), "version"),
    (("cluster", "use", "demo"), "cluster use"),
    (("exec", "sleep", "--", "true"), "exec"),
])
def test_verbs_without_root_say_so_the_same_way(shared_state: Path, args: tuple[str, ...], verb: str | None) -> None:
    out = as_nobody(shared_state, *args)
    if verb is None:
        assert out.returncode == 1 and "no documents found" in out.stderr
        return
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == f"meshctl: {verb} {REASON}"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_cluster_list_without_root(shared_state: Path) -> None:
    out = as_nobody(shared_state, "cluster", "list")  # readable: listed
    assert out.returncode == 0 and out.stdout.splitlines()[1].split() == ["*", "demo", "incomplete"]
    (shared_state / "demo").chmod(0o700)  # as root keeps a cluster's directory: not "nothing", but why
    out = as_nobody(shared_state, "cluster", "list")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"meshctl: {shared_state / 'demo'}: permission denied: the local clusters' state belongs " \
                         "to root; run it with sudo or as root\n"
    assert as_nobody(shared_state, "version", "--client").stdout == f"client version: {version.mesh_version()}\n"


def test_version_render() -> None:
    found = [{"component": "control plane", "name": "istiod", "version": "0.1.0", "pid": 10,
              "started": "2026-05-02T10:00:00+00:00"},
             {"component": "node agent", "name": "node-1", "version": "0.0.9", "pid": 11,
              "started": "2026-05-01T10:00:00+00:00"},
             {"component": "waypoint", "name": "bookinfo/waypoint", "error": "not answering"}]
    assert version.render("0.1.0", "demo", found).splitlines() == [
        "client version: 0.1.0",
        "cluster demo:",
        "COMPONENT      NAME               VERSION  PID  STARTED                    STATUS",
        "control plane  istiod             0.1.0    10   2026-05-02T10:00:00+00:00  running",
        "node agent     node-1             0.0.9    11   2026-05-01T10:00:00+00:00  running",
        "waypoint       bookinfo/waypoint  -        -    -                          not answering",
        "note: components run different versions (0.0.9, 0.1.0): restart the older ones (`meshctl agent restart "
        "NODE`)",
    ]


def test_a_permission_error_a_verb_did_not_foresee_says_root(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    def denied(args: Any) -> int:
        raise PermissionError(13, "Permission denied", "/run/ambient-mesh/demo/controlplane/debug.sock")

    monkeypatch.setattr(version, "run", denied)
    code, out, err = meshctl(capsys, "version")
    assert (code, out) == (1, "")
    assert err == f"meshctl: version {REASON.rstrip()} (/run/ambient-mesh/demo/controlplane/debug.sock: " \
                  "permission denied)\n"
