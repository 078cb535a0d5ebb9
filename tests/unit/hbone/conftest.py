"""Fixtures for the HBONE tests: a mesh CA (the project's own signing core) and SVIDs minted from it."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest

from ca.authority import CertificateAuthority
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle

Mint = Callable[[SpiffeId], Svid]


def mint_from(authority: CertificateAuthority) -> Mint:
    def mint(identity: SpiffeId) -> Svid:
        key = generate_key()
        issued = authority.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1))
        return accept_issued(issued.pems, key, identity, load_trust_bundle(authority.root_pem))

    return mint


@pytest.fixture(scope="session")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    path: Path = tmp_path_factory.mktemp("hbone-ca")
    return CertificateAuthority.load_or_create(path / "ca")


@pytest.fixture(scope="session")
def mint(authority: CertificateAuthority) -> Mint:
    return mint_from(authority)
