"""Fixtures for the CA tests: a CA in a temporary directory, a token issuer, pods on two nodes, and a
real TLS gRPC server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.pods import InMemoryPodLocator, PodPlacement
from ca.server import RunningCA, start_ca_server
from mesh.proto import ca_pb2_grpc


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def issuer() -> NodeTokenIssuer:
    return NodeTokenIssuer.generate()


@pytest.fixture
def pods() -> InMemoryPodLocator:
    return InMemoryPodLocator(
        [
            PodPlacement("default", "sleep-1", "sleep", "node-a"),
            PodPlacement("prod", "web-1", "web", "node-b"),
        ]
    )


@pytest.fixture
def running_ca(
    authority: CertificateAuthority, issuer: NodeTokenIssuer, pods: InMemoryPodLocator
) -> Iterator[RunningCA]:
    server = start_ca_server(authority, issuer.authenticator(), pods)
    yield server
    server.stop(None)


@pytest.fixture
def stub(running_ca: RunningCA) -> Iterator[ca_pb2_grpc.IstioCertificateServiceStub]:
    creds = grpc.ssl_channel_credentials(root_certificates=running_ca.root_pem.encode())
    with grpc.secure_channel(running_ca.address, creds) as channel:
        yield ca_pb2_grpc.IstioCertificateServiceStub(channel)

