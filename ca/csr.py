"""Sans-IO checks of a certificate signing request: parse it, verify it, and read the one identity it
asks for.  Nothing here knows who is asking; `ca.policy` decides whether they may."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from ca.errors import CSRError, SANError
from mesh.identity import IdentityError, SpiffeId

# A P-256 CSR with one URI SAN is well under 1 KiB; anything much larger is not one of ours.
MAX_CSR_BYTES = 16 * 1024


@dataclass(frozen=True)
class CheckedCSR:
    """A CSR whose signature verifies, whose key is P-256, and which asks for exactly one identity."""

    public_key: ec.EllipticCurvePublicKey
    identity: SpiffeId


def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR; `CSRError` if it is empty, too large, or not a CSR."""
    if not pem:
        raise CSRError("csr is empty: send a PEM-encoded PKCS#10 certificate signing request")
    if len(pem) > MAX_CSR_BYTES:
        raise CSRError(f"csr is {len(pem)} bytes; the CA accepts CSRs up to {MAX_CSR_BYTES} bytes")
    try:
        return x509.load_pem_x509_csr(pem.encode("utf-8", "replace"))
    except ValueError as exc:
        raise CSRError(f"csr is not a PEM-encoded PKCS#10 certificate signing request ({exc})") from None


def requested_identity(csr: x509.CertificateSigningRequest) -> SpiffeId:
    """The one SPIFFE ID the CSR asks for.  Exactly one SAN, of URI type, that parses as an identity."""
    try:
        ext = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        raise SANError(
            "CSR has no subject alternative name: put the workload's SPIFFE ID in one URI SAN"
        ) from None
    except ValueError as exc:
        raise CSRError(f"CSR extensions cannot be parsed ({exc})") from None
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    names = list(san)
    for name in names:
        if not isinstance(name, x509.UniformResourceIdentifier):
            raise SANError(
                f"CSR asks for {_describe(name)}: workload certificates carry only a URI SAN (the SPIFFE ID)"
            )
    if len(names) != 1:
        raise SANError(f"CSR has {len(names)} URI SANs; a workload certificate carries exactly one identity")
    try:
        return SpiffeId.parse(names[0].value)
    except IdentityError as exc:
        raise SANError(f"CSR SAN: {exc}") from None


def check_csr(pem: str) -> CheckedCSR:
    """Everything about a CSR that can be checked without knowing the caller."""
    csr = parse_csr(pem)
    if not csr.is_signature_valid:
        raise CSRError(
            "CSR signature does not verify: it was not signed by the key it carries (proof of possession failed)"
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CSRError(f"CSR key is {_key_kind(key)}; workload keys must be ECDSA P-256")
    return CheckedCSR(key, requested_identity(csr))


def _describe(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS name {name.value!r}"
    if isinstance(name, x509.IPAddress):
        return f"IP address {name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email address {name.value!r}"
    return f"a {type(name).__name__} SAN"


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA on {key.curve.name}"
    return type(key).__name__.lstrip("_")
