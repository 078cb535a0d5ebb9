"""meshctl apply/delete/get/label/waypoint against a real apply API on a temporary Unix socket."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from meshctl.main import main

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "istio"


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    store = Store(tmp_path / "store")
    with ApiServer(store, tmp_path / "api.sock"):
        yield str(tmp_path / "api.sock")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_apply_get_delete_bookinfo(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "apply", "-f", str(FIXTURES / "bookinfo-platform.yaml"),
                     "-f", str(FIXTURES / "destination-rule-all.yaml"), "--socket", sock)
    assert rc == 0 and "pod/reviews-v2 in default created" in out
    rc, out, _ = run(capsys, "apply", "-f", str(FIXTURES / "virtual-service-reviews-20-80.yaml"), "--socket", sock)
    assert (rc, out) == (0, "virtualservice.networking.istio.io/reviews in default created\n")
    rc, out, _ = run(capsys, "get", "pods", "--socket", sock)
    assert rc == 0 and out.splitlines()[0].split() == ["NAME", "IP", "NODE", "SERVICE", "ACCOUNT", "VERSION"]
    assert out.splitlines()[-1].split() == ["reviews-v3", "10.244.2.12", "node-2", "bookinfo-reviews", "1"]
    rc, out, _ = run(capsys, "get", "vs", "reviews", "-o", "yaml", "--socket", sock)
    body = yaml.safe_load(out)
    assert [r["weight"] for r in body["spec"]["http"][0]["route"]] == [20, 80]
    rc, out, _ = run(capsys, "get", "destinationrules", "-A", "-o", "json", "--socket", sock)
    assert [i["metadata"]["name"] for i in json.loads(out)["items"]] == ["details", "productpage", "ratings", "reviews"]
    rc, out, err = run(capsys, "delete", "dr", "reviews", "--socket", sock)
    assert rc == 1 and err.startswith("meshctl: subset 'v1' of reviews.default.svc.cluster.local is still used")
    rc, out, _ = run(capsys, "delete", "-f", str(FIXTURES / "virtual-service-reviews-20-80.yaml"), "--socket", sock)
    assert (rc, out) == (0, "virtualservice.networking.istio.io/reviews in default deleted\n")
    rc, out, err = run(capsys, "get", "vs", "--socket", sock)
    assert rc == 0 and out == "" and "No VirtualService resources found in namespace default." in err


def test_apply_errors_are_lines_not_tracebacks(sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
                   "spec:\n  hosts: [r]\n  http:\n  - timeout: 1x\n    route:\n    - destination: {host: r}\n"
                   "      weight: 10\n    - destination: {host: r}\n      weight: 10\n")
    rc, out, err = run(capsys, "apply", "-f", str(bad), "--socket", sock)
    assert rc == 1 and out == ""
    assert err.splitlines() == [
        f"error: {bad}:document 1:spec.http[0].timeout: '1x' is not a duration: write a number and a unit, like 2s, 100ms, 1.5s or 1m",
        f"error: {bad}:document 1:spec.http[0].route[1].weight: the weights of the 2 destinations sum to 20; they must sum to 100",
        "meshctl: 2 errors: nothing was applied"]
    rc, _, err = run(capsys, "apply", "-f", str(tmp_path / "missing.yaml"), "--socket", sock)
    assert rc == 1 and err == f"meshctl: {tmp_path / 'missing.yaml'}: no such file or directory\n"
    rc, _, err = run(capsys, "get", "widgets", "--socket", sock)
    assert rc == 1 and err.startswith("meshctl: unknown kind 'widgets'")


def test_apply_from_stdin_and_directory(sock: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"))
    rc, out, _ = run(capsys, "apply", "-f", "-", "--socket", sock)
    assert (rc, out) == (0, "namespace/shop created\n")
    d = tmp_path / "conf"
    d.mkdir()
    (d / "a.yaml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n")
    (d / "b.yml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: b}\n")
    (d / "notes.txt").write_text("ignored")
    rc, out, _ = run(capsys, "apply", "-f", str(d), "-n", "shop", "--socket", sock)
    assert out.splitlines() == ["serviceaccount/a in shop created", "serviceaccount/b in shop created"]
    rc, out, _ = run(capsys, "apply", "--dry-run", "-f", str(d), "--socket", sock)
    assert out == "2 documents valid (dry run: nothing sent)\n"


def test_label_and_waypoint(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "apply", "-f", str(FIXTURES / "bookinfo-platform.yaml"), "--socket", sock)
    rc, out, _ = run(capsys, "label", "namespace", "default", "istio.io/dataplane-mode=none", "team=books", "--socket", sock)
    assert (rc, out) == (0, "namespace/default labeled\n")
    rc, out, _ = run(capsys, "label", "pod", "ratings-v1", "istio.io/dataplane-mode=ambient", "-n", "default", "--socket", sock)
    assert rc == 0
    rc, _, err = run(capsys, "label", "service", "reviews", "istio.io/use-waypoint=Bad_Name", "--socket", sock)
    assert rc == 1 and "istio.io/use-waypoint must name a waypoint Gateway" in err
    rc, out, _ = run(capsys, "waypoint", "apply", "-n", "default", "--enroll-namespace", "--no-wait", "--socket", sock)
    assert out.splitlines() == ["waypoint default/waypoint applied",
                                'namespace default labeled with "istio.io/use-waypoint: waypoint"']
    rc, out, _ = run(capsys, "get", "gateway", "waypoint", "-o", "yaml", "--socket", sock)
    body = yaml.safe_load(out)
    assert body["spec"] == {"gatewayClassName": "istio-waypoint",
                            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    assert body["metadata"]["labels"] == {"istio.io/waypoint-for": "service"}
    rc, out, _ = run(capsys, "waypoint", "list", "--socket", sock)
    assert out.splitlines()[1].split() == ["default", "waypoint", "service", "0/0", "4"]
    rc, out, _ = run(capsys, "get", "ns", "--socket", sock)
    assert out.splitlines()[1].split()[:3] == ["default", "none", "waypoint"]
    rc, out, _ = run(capsys, "label", "namespace", "default", "team-", "--socket", sock)
    rc, out, _ = run(capsys, "waypoint", "delete", "-n", "default", "--no-wait", "--socket", sock)
    assert out.splitlines() == ["namespace default label istio.io/use-waypoint removed", "waypoint default/waypoint deleted"]
    rc, out, _ = run(capsys, "get", "ns", "default", "-o", "json", "--socket", sock)
    assert json.loads(out)["metadata"]["labels"] == {"istio.io/dataplane-mode": "none"}
    rc, _, err = run(capsys, "waypoint", "delete", "-n", "default", "--socket", sock)
    assert rc == 1 and err == "meshctl: no waypoint waypoint in namespace default\n"


def test_help_reads_well(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in (["apply"], ["delete"], ["get"], ["label"], ["waypoint"], ["waypoint", "apply"], ["waypoint", "list"]):
        with pytest.raises(SystemExit) as info:
            main([*verb, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: meshctl " + " ".join(verb))
