"""Fixtures for the HBONE tests: a mesh CA (the project's own signing core) and SVIDs minted from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hbone_helpers import Mint, mint_from

from ca.authority import CertificateAuthority


@pytest.fixture(scope="session")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    path: Path = tmp_path_factory.mktemp("hbone-ca")
    return CertificateAuthority.load_or_create(path / "ca")


@pytest.fixture(scope="session")
def mint(authority: CertificateAuthority) -> Mint:
    return mint_from(authority)
