"""`mesh.secrets.bundle.TrustBundle`: the roots of a file that is replaced, read again when it changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.authority import generate_root, to_pem
from mesh.files import write_atomic
from mesh.secrets.bundle import TrustBundle
from mesh.secrets.errors import SecretsError
from mesh.secrets.x509 import load_pem_certificate


def test_a_replaced_file_is_read_again_and_a_broken_one_ignored(tmp_path: Path) -> None:
    path = tmp_path / "root-cert.pem"
    (_, root_a), (_, root_b) = generate_root(), generate_root()
    pem_a, pem_b = to_pem(root_a), to_pem(root_b)
    a, b = load_pem_certificate(pem_a), load_pem_certificate(pem_b)
    write_atomic(path, pem_a.encode())
    bundle = TrustBundle.from_file(path)
    assert bundle.certs() == (a,) and bundle.version == 1
    write_atomic(path, (pem_b + pem_a).encode())
    assert bundle.pem() == (pem_b + pem_a).encode()
    assert bundle.certs() == (b, a) and bundle.version == 2
    write_atomic(path, b"")
    assert bundle.refresh() is False and bundle.certs() == (b, a)
    path.unlink()
    assert bundle.refresh() is False and bundle.certs() == (b, a)


def test_a_missing_file_cannot_start_a_process(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="cannot read"):
        TrustBundle.from_file(tmp_path / "nope.pem")
