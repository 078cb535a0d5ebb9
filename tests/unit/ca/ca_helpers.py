"""Helpers shared by the CA tests (imported by name: this directory is on sys.path under pytest)."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
WEB = "spiffe://cluster.local/ns/prod/sa/web"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(
    key: ec.EllipticCurvePrivateKey | None = None,
    sans: Sequence[x509.GeneralName] | None = None,
    *,
    uri: str = SLEEP,
) -> str:
    """A CSR built with `cryptography`; `sans=[]` means no SAN extension at all."""
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    names = [x509.UniformResourceIdentifier(uri)] if sans is None else list(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
