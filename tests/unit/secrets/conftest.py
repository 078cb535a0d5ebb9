"""Fixtures for the secret manager tests: a real CA on loopback TLS gRPC, and clients for two nodes."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.pods import InMemoryPodLocator, PodPlacement
from ca.server import RunningCA, start_ca_server
from mesh.secrets.client import CAClient


@pytest.fixture
def issuer() -> NodeTokenIssuer:
    return NodeTokenIssuer.generate()


@pytest.fixture
def running_ca(tmp_path: Path, issuer: NodeTokenIssuer) -> Iterator[RunningCA]:
    authority = CertificateAuthority.load_or_create(tmp_path / "ca", max_ttl=datetime.timedelta(days=2))
    pods = InMemoryPodLocator(
        [
            PodPlacement("default", "sleep-1", "sleep", "node-a"),
            PodPlacement("prod", "web-1", "web", "node-b"),
            PodPlacement("prod", "intruder-1", "intruder", "node-b"),
        ]
    )
    server = start_ca_server(authority, issuer.authenticator(), pods)
    yield server
    server.stop(None)


def _client(ca: RunningCA, issuer: NodeTokenIssuer, node: str) -> Iterator[CAClient]:
    with CAClient(ca.address, ca.root_pem, issuer.mint_node_token(node), timeout=5) as client:
        yield client


@pytest.fixture
def node_a(running_ca: RunningCA, issuer: NodeTokenIssuer) -> Iterator[CAClient]:
    yield from _client(running_ca, issuer, "node-a")


@pytest.fixture
def node_b(running_ca: RunningCA, issuer: NodeTokenIssuer) -> Iterator[CAClient]:
    yield from _client(running_ca, issuer, "node-b")
