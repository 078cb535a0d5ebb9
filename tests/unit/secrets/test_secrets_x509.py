"""`mesh.secrets.x509`: the data plane's DER reader, checked against `cryptography`'s reading of the same
certificates, and fed bad bytes (it must only ever raise `InvalidCertificateError`)."""

from __future__ import annotations

import base64
import contextlib
import datetime
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.identity import IdentityError, identity_of_der
from mesh.secrets.errors import InvalidCertificateError
from mesh.secrets.x509 import Certificate, load_pem_certificate, load_pem_certificates

URI = "spiffe://cluster.local/ns/a/sa/b"
START = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def _make(sans: Sequence[x509.GeneralName] = (x509.UniformResourceIdentifier(URI),), *,
          not_after: datetime.datetime = START + datetime.timedelta(days=1), serial: int = 0x1234_5678_9ABC,
          extra: bool = True) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name)
               .public_key(key.public_key()).serial_number(serial)
               .not_valid_before(START).not_valid_after(not_after))
    if extra:  # other extensions around the SAN, as the CA's certificates have
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    if extra:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return builder.sign(key, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


REFERENCE = _make([x509.DNSName("x.example"), x509.UniformResourceIdentifier(URI),
                   x509.UniformResourceIdentifier("https://other.example/")])
REFERENCE_DER = _der(REFERENCE)


def test_reads_what_cryptography_reads() -> None:
    cert = Certificate.from_der(REFERENCE_DER)
    assert cert.der == REFERENCE_DER
    assert cert.serial_number == REFERENCE.serial_number == 0x1234_5678_9ABC
    assert cert.not_valid_before_utc == REFERENCE.not_valid_before_utc == START
    assert cert.not_valid_after_utc == REFERENCE.not_valid_after_utc
    assert cert.uri_sans == (URI, "https://other.example/")
    assert cert.public_key_der == REFERENCE.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.sha256_fingerprint == REFERENCE.fingerprint(hashes.SHA256())
    assert identity_of_der(_der(_make())).uri == URI


def test_generalized_time_and_no_extensions() -> None:
    # RFC 5280: dates in 2050 or later are GeneralizedTime.
    late = datetime.datetime(2051, 6, 7, 8, 9, 10, tzinfo=datetime.UTC)
    cert = Certificate.from_der(_der(_make((), not_after=late, extra=False)))
    assert cert.not_valid_after_utc == late and cert.not_valid_before_utc == START
    assert cert.uri_sans == ()


def test_pem_round_trip_and_equality_by_der() -> None:
    pem = REFERENCE.public_bytes(serialization.Encoding.PEM)
    cert = load_pem_certificate(pem)
    assert cert.pem() == pem
    other = _make()
    both = load_pem_certificates(b"comment\n" + pem + b"\n" + other.public_bytes(serialization.Encoding.PEM))
    assert both == (cert, Certificate.from_der(_der(other)))
    assert len({cert, load_pem_certificate(pem.decode())}) == 1
    assert "BEGIN" not in repr(cert) and "serial=123456789abc" in repr(cert)


def _with_length(der: bytes, new_first_length: bytes) -> bytes:
    """The outer SEQUENCE's header replaced (its value kept)."""
    header = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    return bytes((der[0],)) + new_first_length + der[header:]


@pytest.mark.parametrize(("data", "message"), [
    (b"", "truncated at byte 0"),
    (b"\x30", "truncated at byte 0"),
    (REFERENCE_DER[:-1], "runs past the end"),
    (REFERENCE_DER + b"\x00", "1 bytes after its end"),
    (b"\x31" + REFERENCE_DER[1:], "expected tag 0x30 at byte 0, found 0x31"),
    (b"\x1f\x01\x00", "multi-byte tag"),
    (b"\x30\x80\x00\x00", "unsupported length form"),  # indefinite length is BER, not DER
    (b"\x30\x85\x00\x00\x00\x00\x01\x00", "unsupported length form"),
    (b"\x30\x81\x05\x02\x01\x01\x30\x00", "not in its shortest form"),
    (_with_length(REFERENCE_DER, b"\x84\x7f\xff\xff\xff"), "runs past the end"),
    (b"\x30\x03\x02\x01\x01", r"not \(TBSCertificate, AlgorithmIdentifier, BIT STRING\)"),
    (b"\x30\x07\x30\x00\x30\x00\x03\x01\x00", "0 fields, too few"),
])
def test_refuses_bad_der(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCertificateError, match=message):
        Certificate.from_der(data)
    with pytest.raises(IdentityError, match="not valid DER"):
        identity_of_der(data)


def test_refuses_a_bad_time() -> None:
    utc = REFERENCE_DER.find(b"\x17\x0d260102030405Z")
    assert utc > 0
    bad = REFERENCE_DER[:utc] + b"\x17\x0d261302030405Z" + REFERENCE_DER[utc + 15 :]
    with pytest.raises(InvalidCertificateError, match="notBefore: b'261302030405Z' is not a valid time"):
        Certificate.from_der(bad)
    local = REFERENCE_DER[:utc] + b"\x17\x0d2601020304051" + REFERENCE_DER[utc + 15 :]
    with pytest.raises(InvalidCertificateError, match="not a time in the form RFC 5280 allows"):
        Certificate.from_der(local)


def test_every_truncation_is_refused() -> None:
    for n in range(len(REFERENCE_DER)):
        with pytest.raises(InvalidCertificateError):
            Certificate.from_der(REFERENCE_DER[:n])


@pytest.mark.parametrize(("pem", "message"), [
    ("", "no CERTIFICATE block"),
    ("nothing here", "no CERTIFICATE block"),
    ("-----BEGIN CERTIFICATE-----\nMIIB\n", "without its END line"),
    ("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "certificate 1: not valid base64"),
    ("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", "certificate 1: certificate: not"),
    ("-----BEGIN CERTIFICATE-----\n\u00e9\n-----END CERTIFICATE-----\n", "not ASCII"),
])
def test_refuses_bad_pem(pem: str, message: str) -> None:
    with pytest.raises(InvalidCertificateError, match=message):
        load_pem_certificates(pem)


def test_one_certificate_means_one() -> None:
    pem = REFERENCE.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCertificateError, match="holds 2 certificates"):
        load_pem_certificate(pem + pem)


def _only_its_error(data: bytes) -> None:
    with contextlib.suppress(InvalidCertificateError):
        Certificate.from_der(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_its_error(data: bytes) -> None:
    _only_its_error(data)
    _only_its_error(b"\x30" + data)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(REFERENCE_DER) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(REFERENCE_DER)))
def test_mutated_certificates_raise_only_its_error(changes: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(REFERENCE_DER)
    for pos, value in changes:
        data[pos] = value
    _only_its_error(bytes(data))
    _only_its_error(bytes(data[:cut]) + bytes(data[cut + 1 :]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_pem_raises_only_its_error(body: bytes) -> None:
    text = b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(body) + b"\n-----END CERTIFICATE-----\n"
    with contextlib.suppress(InvalidCertificateError):
        load_pem_certificates(text)
