"""The bookinfo samples (examples/bookinfo/samples/): each file is valid on its own (`meshctl apply
--dry-run`), and the control plane's store accepts each one on top of the bookinfo cluster's objects (the
cross-resource checks: subsets a route names, the services a policy targets), as `meshctl apply` sends it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from localcluster import plan, registration, spec
from mesh.api.client import register_cluster_objects
from mesh.api.kinds import resolve_kind
from meshctl.main import main

BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo"
SAMPLES = BOOKINFO / "samples"
# In the order the samples README gives: the waypoint and the subsets before what uses them.
ORDER = ["waypoint/waypoint.yaml", "networking/destination-rule-all.yaml"]
FILES = ORDER + sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.rglob("*.yaml")
                       if str(p.relative_to(SAMPLES)) not in ORDER)
KINDS = ["VirtualService", "DestinationRule", "AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication",
         "Gateway", "HTTPRoute"]


def test_every_kind_has_a_sample_and_the_readme_lists_every_file() -> None:
    text = "".join(p.read_text() for p in SAMPLES.rglob("*.yaml"))
    assert all(f"kind: {kind}\n" in text for kind in KINDS if resolve_kind(kind) is not None)
    readme = (SAMPLES / "README.md").read_text()
    assert [f for f in FILES if f"`{f}`" not in readme] == []


@pytest.mark.parametrize("name", FILES)
def test_sample_is_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    if "kind: HTTPRoute" in (SAMPLES / name).read_text() and resolve_kind("HTTPRoute") is None:
        pytest.skip("HTTPRoute is not a known kind in this tree yet")
    assert main(["apply", "--dry-run", "-f", str(SAMPLES / name)]) == 0
    assert "valid (dry run: nothing sent)" in capsys.readouterr().out


@pytest.fixture
def bookinfo_api(tmp_path: Path) -> Iterator[str]:
    """A control plane's apply API holding what `cluster up -f examples/bookinfo/cluster.yaml` registers."""
    sock = tmp_path / "api.sock"
    cluster = spec.load(BOOKINFO / "cluster.yaml")
    with ApiServer(Store(tmp_path / "store"), sock):
        register_cluster_objects(sock, registration.cluster_objects(cluster, plan.make_plan(cluster)))
        yield str(sock)


def test_the_store_accepts_every_sample(bookinfo_api: str, capsys: pytest.CaptureFixture[str]) -> None:
    for name in FILES:
        if "kind: HTTPRoute" in (SAMPLES / name).read_text() and resolve_kind("HTTPRoute") is None:
            continue
        code = main(["apply", "-f", str(SAMPLES / name), "--socket", bookinfo_api])
        out, err = capsys.readouterr()
        assert code == 0, f"{name}: {err}"
        assert " created" in out or " configured" in out or " unchanged" in out, f"{name}: {out}"
