"""`meshctl analyze`, apply-time warnings and refusals of missing namespaces, against a real apply API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from mesh.api.client import ApiClient
from meshctl.analyze import FOUND_ISSUES
from meshctl.main import main

PLATFORM = """
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews}}
spec: {nodeName: node-1, containers: [{name: app, command: [app]}]}
status: {phase: Running, podIP: 10.244.1.5}
"""

RA_SELECTOR = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  jwtRules: [{issuer: me, jwksUri: "https://idp.example.com/jwks.json"}]
"""

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
"""


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    with ApiServer(Store(tmp_path / "store"), tmp_path / "api.sock"):
        yield str(tmp_path / "api.sock")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_apply_prints_warnings_for_what_is_not_enforced(sock: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "apply", "-f", write(tmp_path, "p.yaml", PLATFORM), "--socket", sock)
    assert rc == 0 and err == ""  # nothing to say about the platform itself
    rc, out, err = run(capsys, "apply", "-f", write(tmp_path, "ra.yaml", RA_SELECTOR), "--socket", sock)
    assert (rc, out) == (0, "requestauthentication.security.istio.io/jwt in bookinfo created\n")
    assert err.startswith("Warning: [AMB0106] (RequestAuthentication jwt.bookinfo) a selector picks workloads' "
                          "sidecars, and in ambient mode there are none: this RequestAuthentication is not enforced")
    # It is also in the object's status, as the control plane reads it back ...
    rc, out, _ = run(capsys, "get", "requestauthentication", "jwt", "-n", "bookinfo", "-o", "yaml", "--socket", sock)
    body = yaml.safe_load(out)
    assert [m["type"]["code"] for m in body["status"]["validationMessages"]] == ["AMB0106"]
    # ... and applying what was read back is accepted: the messages are the control plane's, not the writer's.
    rc, out, err = run(capsys, "apply", "-f", write(tmp_path, "back.yaml", out), "--socket", sock)
    assert rc == 0 and "unchanged" in out and "AMB0106" in err
    assert "status" not in ApiClient(sock).request("GET", "/resources?kind=Namespace")["items"][0]


def test_label_warns_of_a_missing_waypoint(sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "apply", "-f", write(tmp_path, "p.yaml", PLATFORM), "--socket", sock)
    rc, out, err = run(capsys, "label", "namespace", "bookinfo", "istio.io/use-waypoint=nosuch", "--socket", sock)
    assert (rc, out) == (0, "namespace/bookinfo labeled\n")
    assert err.startswith("Warning: [AMB0101] (Namespace bookinfo) istio.io/use-waypoint=nosuch names waypoint "
                          "bookinfo/nosuch, which does not exist")
    rc, out, err = run(capsys, "label", "namespace", "bookinfo", "istio.io/use-waypoint-", "--socket", sock)
    assert (rc, err) == (0, "")


def test_objects_in_a_missing_namespace_are_refused(sock: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    both = write(tmp_path, "both.yaml", PLATFORM.split("---")[0] + "---" + VS.replace("bookinfo}", "bookinf}"))
    rc, out, err = run(capsys, "apply", "-f", both, "--socket", sock)
    assert (rc, out) == (1, "")
    assert err == f'meshctl: {both}:document 2:metadata.namespace: namespaces "bookinf" not found\n'
    assert ApiClient(sock).get("Namespace") == []  # nothing half-applied
    rc, _, err = run(capsys, "apply", "-n", "bookinf", "-f", write(tmp_path, "sa.yaml",
                                                                   "apiVersion: v1\nkind: ServiceAccount\n"
                                                                   "metadata: {name: a}\n"), "--socket", sock)
    assert rc == 1 and err.endswith('metadata.namespace: namespaces "bookinf" not found\n')
    # A namespace and its contents in one apply, and the namespaces that always exist, are fine.
    rc, _, _ = run(capsys, "apply", "-f", write(tmp_path, "ok.yaml", PLATFORM), "--socket", sock)
    rc2, _, _ = run(capsys, "apply", "-f", write(tmp_path, "d.yaml", VS.replace("bookinfo}", "default}")),
                    "--socket", sock)
    assert (rc, rc2) == (0, 0)


def test_analyze_lines_exit_status_and_formats(sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "apply", "-f", write(tmp_path, "p.yaml", PLATFORM), "--socket", sock)
    rc, out, _ = run(capsys, "analyze", "-n", "bookinfo", "--socket", sock)
    assert (rc, out) == (0, "\u2714 No validation issues found when analyzing namespace: bookinfo.\n")
    run(capsys, "apply", "-f", write(tmp_path, "vs.yaml", VS), "-f", write(tmp_path, "ra.yaml", RA_SELECTOR),
        "--socket", sock)
    rc, out, _ = run(capsys, "analyze", "-n", "bookinfo", "--socket", sock)
    assert rc == 0  # warnings only
    assert [line.split(" (")[0] for line in out.splitlines()] == ["Warning [AMB0106]", "Warning [AMB0102]"]
    assert out.splitlines()[1].startswith("Warning [AMB0102] (VirtualService reviews.bookinfo) service "
                                          "reviews.bookinfo.svc.cluster.local has no waypoint")
    rc, _, _ = run(capsys, "analyze", "-n", "bookinfo", "--failure-threshold", "Warning", "--socket", sock)
    assert rc == FOUND_ISSUES
    run(capsys, "label", "namespace", "bookinfo", "istio.io/use-waypoint=nosuch", "--socket", sock)
    rc, out, _ = run(capsys, "analyze", "-n", "bookinfo", "--socket", sock)
    assert rc == FOUND_ISSUES and out.splitlines()[0].startswith("Error [AMB0101] (Namespace bookinfo)")
    rc, out, _ = run(capsys, "analyze", "-A", "-o", "json", "--socket", sock)
    found = json.loads(out)
    assert rc == FOUND_ISSUES and {m["code"] for m in found} == {"AMB0101", "AMB0102", "AMB0106"}
    assert found[0] == {"code": "AMB0101", "name": "UseWaypointNotFound", "level": "Error", "kind": "Namespace",
                        "namespace": "", "resource": "bookinfo", "origin": "Namespace bookinfo",
                        "message": found[0]["message"]}
    rc, out, _ = run(capsys, "analyze", "-A", "-o", "yaml", "--socket", sock)
    assert yaml.safe_load(out) == found
    rc, out, _ = run(capsys, "analyze", "--socket", sock)  # the default namespace: nothing there
    assert (rc, out) == (0, "\u2714 No validation issues found when analyzing namespace: default.\n")


def test_analyze_bad_input(sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "analyze", "-n", "nosuch", "--socket", sock)
    assert (rc, err) == (1, 'meshctl: namespaces "nosuch" not found\n')
    with pytest.raises(SystemExit) as info:
        main(["analyze", "-n", "a", "-A", "--socket", sock])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["analyze", "-o", "xml", "--socket", sock])
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    rc, _, err = run(capsys, "analyze", "--socket", str(tmp_path / "none.sock"))
    assert rc == 1 and err.startswith("meshctl: cannot reach the control plane at")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--help"])
    assert info.value.code == 0 and "AMB0109" in capsys.readouterr().out
