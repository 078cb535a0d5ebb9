"""Accepting what the CA returns only when it is right."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from secrets_helpers import SLEEP, WEB, issue

from ca.authority import CertificateAuthority, generate_root, to_pem
from ca.server import RunningCA
from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.errors import CertificateRequestError, InvalidCertificateError
from mesh.secrets.openssl import PrivateKey
from mesh.secrets.svid import accept_issued, generate_key, load_trust_bundle, make_csr


def test_issued_over_grpc(node_a: CAClient, running_ca: RunningCA) -> None:
    svid = issue(node_a, running_ca.root_pem, SLEEP)
    assert svid.identity == SLEEP
    assert svid.trust_bundle_pem() == running_ca.root_pem
    assert svid.chain_pem().count(b"BEGIN CERTIFICATE") == 1  # the root is not sent
    assert "PRIVATE" not in repr(svid)


def test_client_errors_say_what_the_ca_said(node_a: CAClient, running_ca: RunningCA) -> None:
    with pytest.raises(CertificateRequestError, match="PERMISSION_DENIED: .*scheduled on node 'node-a'") as info:
        issue(node_a, running_ca.root_pem, WEB)
    assert not info.value.retryable and info.value.code == "PERMISSION_DENIED"


def test_unreachable_ca_is_retryable(running_ca: RunningCA) -> None:
    client = CAClient("127.0.0.1:1", running_ca.root_pem, "token", timeout=2)
    with client, pytest.raises(CertificateRequestError) as info:
        client.create_certificate(make_csr(generate_key(), SLEEP), impersonate=SLEEP)
    assert info.value.retryable and info.value.code == "UNAVAILABLE"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def _chain(ca: CertificateAuthority, key: PrivateKey, identity: SpiffeId = SLEEP) -> list[str]:
    return ca.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1)).pems


def test_refuses_another_key(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCertificateError, match="different key"):
        accept_issued(_chain(ca, generate_key()), generate_key(), SLEEP, load_trust_bundle(ca.root_pem))


def test_refuses_another_identity(ca: CertificateAuthority) -> None:
    key = generate_key()
    with pytest.raises(InvalidCertificateError, match=f"for {WEB}, not {SLEEP}"):
        accept_issued(_chain(ca, key, WEB), key, SLEEP, load_trust_bundle(ca.root_pem))


def test_refuses_an_untrusted_root(ca: CertificateAuthority) -> None:
    key = generate_key()
    _, other = generate_root()
    with pytest.raises(InvalidCertificateError, match="does not end in the mesh root"):
        accept_issued(_chain(ca, key), key, SLEEP, load_trust_bundle(to_pem(other)))


def test_refuses_short_or_garbage_chains(ca: CertificateAuthority) -> None:
    key = generate_key()
    with pytest.raises(InvalidCertificateError, match="returned 1 certificates"):
        accept_issued(_chain(ca, key)[:1], key, SLEEP, load_trust_bundle(ca.root_pem))
    with pytest.raises(InvalidCertificateError, match="cannot be parsed"):
        accept_issued(["junk", "junk"], key, SLEEP, load_trust_bundle(ca.root_pem))


def test_refuses_a_chain_that_does_not_verify(ca: CertificateAuthority) -> None:
    key = generate_key()
    pems = _chain(ca, key)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    with pytest.raises(InvalidCertificateError, match="does not verify"):
        accept_issued(pems, key, SLEEP, load_trust_bundle(ca.root_pem), now=later)


def test_trust_bundle_must_hold_certificates() -> None:
    with pytest.raises(InvalidCertificateError):
        load_trust_bundle("nothing here")
    _, root = generate_root()
    assert [c.der for c in load_trust_bundle(to_pem(root))] == [root.public_bytes(Encoding.DER)]
