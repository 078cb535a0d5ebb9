"""X.509 SVIDs on the client side: make a key and a CSR, and accept what the CA returns only if it is
a valid certificate for that key and identity, chaining to a root we already trust.

The private key is generated here and never serialized except into an in-memory file for `ssl`
(see `mesh.secrets.tls`); it never crosses the network.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from mesh.identity import IdentityError, SpiffeId, identity_of
from mesh.secrets.errors import InvalidCertificateError


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> str:
    """A PEM CSR asking for `identity` as the one URI SAN, signed by `key`."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_trust_bundle(pem: str | bytes) -> tuple[x509.Certificate, ...]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidCertificateError(f"trust bundle is not PEM certificates ({exc})") from None
    if not certs:
        raise InvalidCertificateError("trust bundle holds no certificate")
    return tuple(certs)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Svid:
    """A workload's key, its certificate and chain, and the roots it trusts."""

    identity: SpiffeId
    key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    trust_bundle: tuple[x509.Certificate, ...]
    root: x509.Certificate | None = None  # the root its chain ends in (one of `trust_bundle`)

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def chain_pem(self) -> bytes:
        """Leaf and intermediates, what a TLS endpoint sends (the root is left out)."""
        return b"".join(_pem(c) for c in (self.leaf, *self.intermediates))

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def trust_bundle_pem(self) -> str:
        return b"".join(_pem(c) for c in self.trust_bundle).decode("ascii")

    def __repr__(self) -> str:  # never print the key
        return f"Svid({self.identity}, not_after={self.leaf.not_valid_after_utc.isoformat()})"


def accept_issued(
    chain_pems: Sequence[str],
    key: ec.EllipticCurvePrivateKey,
    identity: SpiffeId,
    trust_bundle: Sequence[x509.Certificate],
    *,
    now: datetime.datetime | None = None,
) -> Svid:
    """Check the CA's answer (leaf first, root last) and wrap it as an `Svid`.

    Refused unless: the leaf holds our public key and exactly `identity`; the chain ends in a root of
    `trust_bundle`; and RFC 5280 path validation from the leaf to that root succeeds now.
    """
    if len(chain_pems) < 2:
        raise InvalidCertificateError(f"CA returned {len(chain_pems)} certificates; expected leaf ... root")
    try:
        certs = [x509.load_pem_x509_certificate(p.encode("ascii")) for p in chain_pems]
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidCertificateError(f"CA returned a certificate that cannot be parsed ({exc})") from None
    leaf, intermediates, root = certs[0], certs[1:-1], certs[-1]
    if leaf.public_key() != key.public_key():
        raise InvalidCertificateError("CA returned a certificate for a different key than the one we sent")
    try:
        got = identity_of(leaf)
    except IdentityError as exc:
        raise InvalidCertificateError(f"CA returned a certificate without a valid identity: {exc}") from None
    if got != identity:
        raise InvalidCertificateError(f"CA returned a certificate for {got}, not {identity}")
    if root not in trust_bundle:
        raise InvalidCertificateError("CA returned a chain that does not end in the mesh root we trust")
    now = now or datetime.datetime.now(datetime.UTC)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(trust_bundle)))
        .time(now)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise InvalidCertificateError(f"CA returned a chain that does not verify: {exc}") from None
    return Svid(identity, key, leaf, tuple(intermediates), tuple(trust_bundle), root)
