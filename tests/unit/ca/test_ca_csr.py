"""Sans-IO CSR checks."""

from __future__ import annotations

import ipaddress

import pytest
from ca_helpers import SLEEP, WEB, csr_pem, new_key
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.csr import check_csr
from ca.errors import CSRError, SANError
from mesh.identity import SpiffeId


def test_good_csr_names_its_identity_and_key() -> None:
    key = new_key()
    checked = check_csr(csr_pem(key))
    assert checked.identity == SpiffeId.parse(SLEEP)
    assert checked.public_key == key.public_key()


@pytest.mark.parametrize("garbage", ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"])
def test_garbage(garbage: str) -> None:
    with pytest.raises(CSRError, match="csr is"):
        check_csr(garbage)


def test_signed_with_another_key() -> None:
    pem = csr_pem()
    # Swap the public key inside the CSR for another one: the signature no longer verifies.
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    real = x509.load_pem_x509_csr(pem.encode()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other = new_key().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = x509.load_der_x509_csr(der.replace(real, other))
    with pytest.raises(CSRError, match="signature does not verify"):
        check_csr(forged.public_bytes(serialization.Encoding.PEM).decode())


def test_no_san() -> None:
    with pytest.raises(SANError, match="no subject alternative name"):
        check_csr(csr_pem(sans=[]))


def test_two_sans() -> None:
    sans = [x509.UniformResourceIdentifier(SLEEP), x509.UniformResourceIdentifier(WEB)]
    with pytest.raises(SANError, match="2 URI SANs"):
        check_csr(csr_pem(sans=sans))


def test_dns_san() -> None:
    sans = [x509.UniformResourceIdentifier(SLEEP), x509.DNSName("sleep.default.svc")]
    with pytest.raises(SANError, match="DNS name 'sleep.default.svc'"):
        check_csr(csr_pem(sans=sans))


def test_ip_san() -> None:
    with pytest.raises(SANError, match="IP address 10.0.0.1"):
        check_csr(csr_pem(sans=[x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]))


def test_uri_that_is_not_a_workload_identity() -> None:
    with pytest.raises(SANError, match="not a workload identity"):
        check_csr(csr_pem(uri="spiffe://cluster.local/something/else"))


def test_wrong_key_type() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SLEEP)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CSRError, match="must be ECDSA P-256"):
        check_csr(csr.public_bytes(serialization.Encoding.PEM).decode())
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CSRError, match="secp384r1"):
        check_csr(csr_pem(p384))  # type: ignore[arg-type]
