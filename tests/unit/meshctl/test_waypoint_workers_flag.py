"""`meshctl waypoint apply --workers N` writes the Gateway's workers annotation (beside the drain time),
against a real apply API; a count out of range is refused and writes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from localcluster.waypoints import DRAIN_ANNOTATION, WORKERS_ANNOTATION
from mesh.api.client import ApiClient
from mesh.api.validate import Document
from meshctl.main import main

NS = "bookinfo"


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    with ApiServer(Store(tmp_path / "store"), tmp_path / "api.sock"):
        client = ApiClient(tmp_path / "api.sock")
        client.apply([Document("t", 1, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})])
        yield str(tmp_path / "api.sock")


def test_workers_are_written_on_the_gateway(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
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
