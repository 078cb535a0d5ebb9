"""The signing core: generated root persisted across restarts, plugged-in cacerts, leaf contents."""

from __future__ import annotations

import datetime
import stat
import subprocess
from pathlib import Path

import pytest
from ca_helpers import SLEEP, new_key
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.authority import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    ROOT_CERT,
    CertificateAuthority,
    generate_intermediate,
    generate_root,
    to_pem,
    write_ca_dir,
)
from ca.errors import CAStoreError, SigningError, TTLError
from ca.inspect import identity_of
from mesh.identity import SpiffeId

IDENTITY = SpiffeId.parse(SLEEP)


def openssl_verify(tmp_path: Path, root_pem: str, untrusted: list[str], leaf_pem: str) -> None:
    (tmp_path / "root.pem").write_text(root_pem)
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    cmd = ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(tmp_path / "root.pem")]
    if untrusted:
        (tmp_path / "untrusted.pem").write_text("".join(untrusted))
        cmd += ["-untrusted", str(tmp_path / "untrusted.pem")]
    result = subprocess.run([*cmd, str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_root_generated_once_with_private_key_file(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(ca_dir)
    assert stat.S_IMODE((ca_dir / CA_KEY).stat().st_mode) == 0o600
    for name in (CA_CERT, ROOT_CERT, CERT_CHAIN):
        assert (ca_dir / name).is_file()
    second = CertificateAuthority.load_or_create(ca_dir)  # a restart
    assert second.root == first.root
    assert second.root_pem == (ca_dir / ROOT_CERT).read_text()
    assert first.chain == (first.root,)


def test_root_certificate_is_a_p256_ca(authority: CertificateAuthority) -> None:
    root = authority.root
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.ca and ku.key_cert_sign
    assert root.issuer == root.subject
    assert "cluster.local" in root.subject.rfc4514_string()


def test_leaf_has_only_the_uri_san_and_default_ttl(authority: CertificateAuthority, tmp_path: Path) -> None:
    key = new_key()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    issued = authority.sign_workload(key.public_key(), IDENTITY, authority.resolve_ttl(0), now=now)
    leaf = issued.leaf
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(SLEEP)]
    assert identity_of(leaf) == IDENTITY
    assert leaf.not_valid_after_utc == now + datetime.timedelta(hours=24)
    assert leaf.not_valid_before_utc <= now
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    pems = issued.pems
    assert len(pems) == 2 and pems[-1] == authority.root_pem
    openssl_verify(tmp_path, authority.root_pem, [], pems[0])


def test_ttl_limits(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(
        tmp_path / "ca", default_ttl=datetime.timedelta(hours=1), max_ttl=datetime.timedelta(hours=2)
    )
    assert ca.resolve_ttl(0) == datetime.timedelta(hours=1)
    assert ca.resolve_ttl(7200) == datetime.timedelta(hours=2)
    with pytest.raises(TTLError, match="above the CA's maximum of 7200s"):
        ca.resolve_ttl(7201)
    with pytest.raises(TTLError, match="negative"):
        ca.resolve_ttl(-1)


def test_leaf_never_outlives_the_signing_certificate(tmp_path: Path) -> None:
    key, root = generate_root(ttl=datetime.timedelta(hours=2))
    write_ca_dir(tmp_path / "ca", key, [root])
    ca = CertificateAuthority.load(tmp_path / "ca", max_ttl=datetime.timedelta(days=30))
    issued = ca.sign_workload(new_key().public_key(), IDENTITY, datetime.timedelta(days=30))
    assert issued.leaf.not_valid_after_utc == root.not_valid_after_utc


def test_plugged_in_intermediate_chain_is_leaf_first_root_last(tmp_path: Path) -> None:
    root_key, root = generate_root()
    int_key, inter = generate_intermediate(root_key, root)
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    (cacerts / CA_CERT).write_text(to_pem(inter))
    (cacerts / CA_KEY).write_bytes(
        int_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (cacerts / ROOT_CERT).write_text(to_pem(root))
    (cacerts / CERT_CHAIN).write_text(to_pem(inter) + to_pem(root))
    ca = CertificateAuthority.load_or_create(cacerts)  # present files: loaded, not replaced
    assert ca.root == root and ca.signing_cert == inter
    issued = ca.sign_workload(new_key().public_key(), IDENTITY, datetime.timedelta(hours=1))
    pems = issued.pems
    assert len(pems) == 3
    assert pems[1] == to_pem(inter) and pems[2] == to_pem(root)
    assert issued.leaf.issuer == inter.subject
    openssl_verify(tmp_path, to_pem(root), [pems[1]], pems[0])


def test_cert_chain_file_is_optional(tmp_path: Path) -> None:
    root_key, root = generate_root()
    int_key, inter = generate_intermediate(root_key, root)
    write_ca_dir(tmp_path / "ca", int_key, [inter, root])
    (tmp_path / "ca" / CERT_CHAIN).unlink()
    ca = CertificateAuthority.load(tmp_path / "ca")
    assert ca.chain == (inter, root)


def test_partial_ca_directory_is_refused_not_replaced(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.load_or_create(ca_dir)
    (ca_dir / CA_KEY).unlink()
    with pytest.raises(CAStoreError, match="missing ca-key.pem"):
        CertificateAuthority.load_or_create(ca_dir)


def test_key_not_matching_certificate_is_refused(tmp_path: Path) -> None:
    _, root = generate_root()
    other_key, _ = generate_root()
    write_ca_dir(tmp_path / "ca", other_key, [root])
    with pytest.raises(CAStoreError, match="does not match"):
        CertificateAuthority.load(tmp_path / "ca")


def test_chain_to_a_different_root_is_refused(tmp_path: Path) -> None:
    root_key, root = generate_root()
    int_key, inter = generate_intermediate(root_key, root)
    _, stranger = generate_root()
    write_ca_dir(tmp_path / "ca", int_key, [inter, stranger])
    with pytest.raises(CAStoreError, match="chain is broken"):
        CertificateAuthority.load(tmp_path / "ca")


def test_garbage_ca_files_are_one_clear_error(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.load_or_create(ca_dir)
    (ca_dir / CA_CERT).write_text("not a certificate")
    with pytest.raises(CAStoreError, match="ca-cert.pem"):
        CertificateAuthority.load(ca_dir)


def test_only_p256_leaf_keys_and_own_trust_domain(authority: CertificateAuthority) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SigningError, match="P-256"):
        authority.sign_workload(p384.public_key(), IDENTITY, datetime.timedelta(hours=1))
    with pytest.raises(SigningError, match="trust domain"):
        authority.sign_workload(
            new_key().public_key(), SpiffeId("other.domain", "default", "sleep"), datetime.timedelta(hours=1)
        )
