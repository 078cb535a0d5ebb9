"""X.509 SVIDs on the client side: make a key and a CSR, and accept what the CA returns only if it is
a valid certificate for that key and identity, chaining to a root we already trust.

The private key is generated here (by the `ssl` module's OpenSSL, `mesh.secrets.openssl`) and held as
its PKCS#8 PEM in this process's memory: it goes only into an in-memory file for `ssl` (see
`mesh.secrets.tls`) and to OpenSSL for the CSR's signature; it never crosses the network.  The CSR is
a few DER elements built here; certificates are read with `mesh.secrets.x509`.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.identity import IdentityError, SpiffeId, identity_of
from mesh.secrets.errors import InvalidCertificateError
from mesh.secrets.openssl import PrivateKey, generate_ec_p256, verify_chain
from mesh.secrets.x509 import Certificate, load_pem_certificate, load_pem_certificates, pem_block

# DER of the few object identifiers a CSR needs.
_OID_EXTENSION_REQUEST = bytes.fromhex("06092a864886f70d01090e")  # 1.2.840.113549.1.9.14 (PKCS #9)
_OID_SUBJECT_ALT_NAME = bytes.fromhex("0603551d11")  # 2.5.29.17
_OID_ECDSA_WITH_SHA256 = bytes.fromhex("06082a8648ce3d040302")  # 1.2.840.10045.4.3.2


def _der(tag: int, content: bytes) -> bytes:
    """One DER element (definite length, shortest form)."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def generate_key() -> PrivateKey:
    return generate_ec_p256()


def make_csr(key: PrivateKey, identity: SpiffeId) -> str:
    """A PEM CSR (PKCS #10) with an empty subject asking for `identity` as the one URI SAN (critical),
    signed by `key` with ECDSA-SHA256."""
    san = _der(0x30, _der(0x86, identity.uri.encode("ascii")))  # SEQUENCE { [6] IA5String }
    extension = _der(0x30, _OID_SUBJECT_ALT_NAME + _der(0x01, b"\xff") + _der(0x04, san))
    attribute = _der(0x30, _OID_EXTENSION_REQUEST + _der(0x31, _der(0x30, extension)))
    info = _der(0x30, _der(0x02, b"\x00") + _der(0x30, b"") + key.public_key_der + _der(0xA0, attribute))
    signature = key.sign_sha256(info)
    csr = _der(0x30, info + _der(0x30, _OID_ECDSA_WITH_SHA256) + _der(0x03, b"\x00" + signature))
    return pem_block("CERTIFICATE REQUEST", csr).decode("ascii")


def load_trust_bundle(pem: str | bytes) -> tuple[Certificate, ...]:
    try:
        return load_pem_certificates(pem)
    except InvalidCertificateError as exc:
        raise InvalidCertificateError(f"trust bundle is not PEM certificates ({exc})") from None


@dataclass(frozen=True)
class Svid:
    """A workload's key, its certificate and chain, and the roots it trusts."""

    identity: SpiffeId
    key: PrivateKey
    leaf: Certificate
    intermediates: tuple[Certificate, ...]
    trust_bundle: tuple[Certificate, ...]
    root: Certificate | None = None  # the root its chain ends in (one of `trust_bundle`)

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def chain_pem(self) -> bytes:
        """Leaf and intermediates, what a TLS endpoint sends (the root is left out)."""
        return b"".join(c.pem() for c in (self.leaf, *self.intermediates))

    def key_pem(self) -> bytes:
        return self.key.pkcs8_pem()

    def trust_bundle_pem(self) -> str:
        return b"".join(c.pem() for c in self.trust_bundle).decode("ascii")

    def __repr__(self) -> str:  # never print the key
        return f"Svid({self.identity}, not_after={self.leaf.not_valid_after_utc.isoformat()})"


def accept_issued(
    chain_pems: Sequence[str],
    key: PrivateKey,
    identity: SpiffeId,
    trust_bundle: Sequence[Certificate],
    *,
    now: datetime.datetime | None = None,
) -> Svid:
    """Check the CA's answer (leaf first, root last) and wrap it as an `Svid`.

    Refused unless: the leaf holds our public key and exactly `identity`; the chain ends in a root of
    `trust_bundle`; and RFC 5280 path validation from the leaf to that root succeeds now (OpenSSL's, for
    a TLS client: the leaf must allow client authentication).
    """
    if len(chain_pems) < 2:
        raise InvalidCertificateError(f"CA returned {len(chain_pems)} certificates; expected leaf ... root")
    try:
        certs = [load_pem_certificate(p) for p in chain_pems]
    except InvalidCertificateError as exc:
        raise InvalidCertificateError(f"CA returned a certificate that cannot be parsed ({exc})") from None
    leaf, intermediates, root = certs[0], certs[1:-1], certs[-1]
    if leaf.public_key_der != key.public_key_der:
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
    problem = verify_chain(leaf.der, [c.der for c in intermediates], [c.der for c in trust_bundle], now)
    if problem is not None:
        raise InvalidCertificateError(f"CA returned a chain that does not verify: {problem}")
    return Svid(identity, key, leaf, tuple(intermediates), tuple(trust_bundle), root)
