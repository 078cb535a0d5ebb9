"""Keys, CSRs and path validation through the `ssl` module's OpenSSL (`mesh.secrets.openssl`), checked
with `cryptography` and with the CA's own CSR checks."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from secrets_helpers import SLEEP

from ca.authority import CertificateAuthority, generate_intermediate, generate_root, to_pem
from ca.csr import check_csr
from mesh.secrets.errors import InvalidCertificateError
from mesh.secrets.openssl import OpenSSLError, verify_chain
from mesh.secrets.svid import accept_issued, generate_key, load_trust_bundle, make_csr
from mesh.secrets.x509 import load_pem_certificate

HOUR = datetime.timedelta(hours=1)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def test_a_key_is_p256_pkcs8_and_its_public_half_matches() -> None:
    key = generate_key()
    assert key.pkcs8_pem().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(key.pkcs8_pem(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1)
    assert key.public_key_der == loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert generate_key().public_key_der != key.public_key_der
    assert "PRIVATE" not in repr(key)


def test_a_signature_verifies_with_the_public_key() -> None:
    key = generate_key()
    public = serialization.load_der_public_key(key.public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(key.sign_sha256(b"data"), b"data", ec.ECDSA(hashes.SHA256()))


def test_the_csr_is_what_the_ca_expects() -> None:
    key = generate_key()
    pem = make_csr(key, SLEEP)
    csr = x509.load_pem_x509_csr(pem.encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    assert csr.signature_hash_algorithm is not None and csr.signature_hash_algorithm.name == "sha256"
    assert [(e.oid, e.critical) for e in csr.extensions] == [(x509.OID_SUBJECT_ALTERNATIVE_NAME, True)]
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(SLEEP.uri)]
    checked = check_csr(pem)  # the CA's own checks: signature, P-256, exactly one identity
    assert checked.identity == SLEEP
    assert checked.public_key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo) == key.public_key_der


def test_an_issued_chain_goes_into_ssl(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = generate_key()
    svid = accept_issued(ca.sign_workload(key.public_key(), SLEEP, HOUR).pems, key, SLEEP,
                         load_trust_bundle(ca.root_pem))
    (tmp_path / "chain.pem").write_bytes(svid.chain_pem())
    (tmp_path / "key.pem").write_bytes(svid.key_pem())
    ssl.create_default_context().load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")


def test_refuses_a_chain_not_yet_valid(ca: CertificateAuthority) -> None:
    key = generate_key()
    pems = ca.sign_workload(key.public_key(), SLEEP, HOUR).pems
    earlier = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    with pytest.raises(InvalidCertificateError, match="does not verify: certificate is not yet valid"):
        accept_issued(pems, key, SLEEP, load_trust_bundle(ca.root_pem), now=earlier)


def test_refuses_a_leaf_signed_by_another_ca_ending_in_our_root(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    key = generate_key()
    forged = other.sign_workload(key.public_key(), SLEEP, HOUR).pems[:-1] + [ca.root_pem]
    with pytest.raises(InvalidCertificateError, match="does not verify: unable to get local issuer certificate"):
        accept_issued(forged, key, SLEEP, load_trust_bundle(ca.root_pem))


def test_refuses_a_leaf_not_for_tls_clients(tmp_path: Path) -> None:
    # What build_client_verifier refused before: a leaf whose extended key usage leaves out clientAuth.
    root_key, root = generate_root()
    key = generate_key()
    public = serialization.load_der_public_key(key.public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root.subject).public_key(public)
            .serial_number(7).not_valid_before(now - HOUR).not_valid_after(now + HOUR)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SLEEP.uri)]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pems = [leaf.public_bytes(serialization.Encoding.PEM).decode(), to_pem(root)]
    with pytest.raises(InvalidCertificateError, match="does not verify: unsuitable certificate purpose"):
        accept_issued(pems, key, SLEEP, load_trust_bundle(to_pem(root)))


def test_openssl_errors_carry_openssl_reasons(ca: CertificateAuthority) -> None:
    root = load_pem_certificate(ca.root_pem)
    with pytest.raises(OpenSSLError, match="d2i_X509 failed: .*asn1|d2i_X509 failed: .*ASN1"):
        verify_chain(b"\x30\x03\x02\x01\x01", [], [root.der], datetime.datetime.now(datetime.UTC))
    # A failed call leaves nothing in OpenSSL's error queue behind it: the next one works.
    key = generate_key()
    pems = ca.sign_workload(key.public_key(), SLEEP, HOUR).pems
    assert verify_chain(load_pem_certificate(pems[0]).der, [], [root.der], datetime.datetime.now(datetime.UTC)) is None


def test_accepts_a_chain_through_an_intermediate(tmp_path: Path) -> None:
    # A plugged-in intermediate signs the workloads: leaf, intermediate, root; the bundle holds the root.
    root_key, root = generate_root()
    int_key, inter = generate_intermediate(root_key, root)
    key = generate_key()
    ca = CertificateAuthority(int_key, [inter, root])
    pems = ca.sign_workload(key.public_key(), SLEEP, HOUR).pems
    assert len(pems) == 3
    svid = accept_issued(pems, key, SLEEP, load_trust_bundle(to_pem(root)))
    assert svid.intermediates == (load_pem_certificate(to_pem(inter)),)
    assert svid.chain_pem().count(b"BEGIN CERTIFICATE") == 2
    # Without its intermediate the leaf does not chain to the root.
    with pytest.raises(InvalidCertificateError, match="does not verify: unable to get local issuer certificate"):
        accept_issued([pems[0], pems[2]], key, SLEEP, load_trust_bundle(to_pem(root)))
