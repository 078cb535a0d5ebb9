"""SPIFFE identity parsing and extraction."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity import IdentityError, SpiffeId, identity_of, identity_of_der
from mesh.secrets.x509 import Certificate


def test_round_trip() -> None:
    ident = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    assert ident == SpiffeId("cluster.local", "default", "sleep")
    assert str(ident) == ident.uri == "spiffe://cluster.local/ns/default/sa/sleep"
    assert SpiffeId.parse(str(ident)) == ident


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe://cluster.local", "has no path"),
        ("spiffe://cluster.local/ns/a", "not a workload identity"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "not a workload identity"),
        ("spiffe://cluster.local/sa/b/ns/a", "not a workload identity"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "invalid trust domain"),
        ("spiffe:///ns/a/sa/b", "invalid trust domain"),
        ("spiffe://cluster.local/ns/A/sa/b", "invalid namespace 'A'"),
        ("spiffe://cluster.local/ns/a/sa/", "invalid service account ''"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "invalid service account"),
        ("spiffe://cluster.local/ns/-a/sa/b", "invalid namespace"),
    ],
)
def test_parse_refuses(uri: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message.replace("?", r"\?")):
        SpiffeId.parse(uri)


def test_not_a_string() -> None:
    with pytest.raises(IdentityError, match="must be a string"):
        SpiffeId.parse(42)  # type: ignore[arg-type]


def _cert(sans: Sequence[x509.GeneralName]) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    return Certificate.from_der(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_identity_of_certificate() -> None:
    cert = _cert([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"), x509.DNSName("x")])
    assert list(cert.uri_sans) == ["spiffe://cluster.local/ns/a/sa/b"]
    assert identity_of(cert) == SpiffeId("cluster.local", "a", "b")
    assert identity_of_der(cert.der) == SpiffeId("cluster.local", "a", "b")


def test_identity_of_certificate_without_exactly_one_uri() -> None:
    with pytest.raises(IdentityError, match="0 URI SANs"):
        identity_of(_cert([]))
    two = [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b")] * 2
    with pytest.raises(IdentityError, match="2 URI SANs"):
        identity_of(_cert(two))
    with pytest.raises(IdentityError, match="not valid DER"):
        identity_of_der(b"junk")
