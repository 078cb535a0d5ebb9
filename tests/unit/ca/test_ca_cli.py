"""`meshctl ca root` and `meshctl ca check`."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from ca_helpers import SLEEP, new_key

from ca.authority import CertificateAuthority, generate_root, to_pem
from mesh.identity import SpiffeId
from meshctl.main import main


@pytest.fixture(autouse=True)
def _no_ambient_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESH_CA_DIR", raising=False)
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path / "no-clusters"))


def write_leaf(ca: CertificateAuthority, path: Path, ttl: datetime.timedelta, **kw: object) -> Path:
    issued = ca.sign_workload(new_key().public_key(), SpiffeId.parse(SLEEP), ttl, **kw)  # type: ignore[arg-type]
    path.write_text("".join(issued.pems))
    return path


def test_root_from_flag_and_env(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert main(["ca", "root", "--root", str(tmp_path / "ca" / "root-cert.pem")]) == 0
    assert capsys.readouterr().out == ca.root_pem
    monkeypatch.setenv("MESH_CA_DIR", str(tmp_path / "ca"))
    assert main(["ca", "root"]) == 0
    assert capsys.readouterr().out == ca.root_pem


def test_root_from_the_local_cluster_state(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("MESH_STATE_DIR", str(state))
    (state / "demo").mkdir(parents=True)
    (state / "demo" / "cluster.json").write_text("{}")
    ca = CertificateAuthority.load_or_create(state / "demo" / "controlplane" / "ca")
    assert main(["ca", "root"]) == 0
    assert capsys.readouterr().out == ca.root_pem


def test_no_root_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "root"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no mesh root" in err and "--root" in err


def test_check_explains_a_valid_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    leaf = write_leaf(ca, tmp_path / "leaf.pem", datetime.timedelta(hours=24))
    assert main(["ca", "check", str(leaf), "--root", str(tmp_path / "ca" / "root-cert.pem")]) == 0
    out = capsys.readouterr().out
    assert f"identity: {SLEEP}" in out
    assert "issuer:   CN=mesh root CA,O=cluster.local" in out
    assert "expires in 23h" in out or "expires in 24h" in out
    assert "verified against" in out and "verdict: valid mesh certificate" in out


def test_check_flags_expired_and_foreign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    leaf = write_leaf(ca, tmp_path / "leaf.pem", datetime.timedelta(hours=1), now=past)
    _, other_root = generate_root()
    (tmp_path / "other.pem").write_text(to_pem(other_root))
    assert main(["ca", "check", str(leaf), "--root", str(tmp_path / "other.pem")]) == 1
    out = capsys.readouterr().out
    assert "EXPIRED" in out and "does NOT chain" in out and "NOT a valid mesh certificate" in out


def test_check_without_a_root_still_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    leaf = write_leaf(ca, tmp_path / "leaf.pem", datetime.timedelta(hours=1))
    assert main(["ca", "check", str(leaf)]) == 1
    out = capsys.readouterr().out
    assert f"identity: {SLEEP}" in out and "chain:    not checked: no mesh root" in out


@pytest.mark.parametrize("content", [None, "garbage"])
def test_check_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None) -> None:
    path = tmp_path / "cert.pem"
    if content is not None:
        path.write_text(content)
    assert main(["ca", "check", str(path), "--root", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshctl: ") and err.count("\n") == 1 and "Traceback" not in err


def test_help_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["ca", "check", "--help"])
    assert "chain to the mesh root" in capsys.readouterr().out
