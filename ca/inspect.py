"""Explain a certificate for humans (`meshctl ca check`): identity, issuer, validity, chain to the root.

Pure: certificates and a time in, an `Explanation` (lines and a verdict) out.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from mesh.identity import IdentityError, SpiffeId


@dataclass
class Explanation:
    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        width = max((len(k) for k, _ in self.lines), default=0)
        out = [f"{k + ':':<{width + 1}} {v}" for k, v in self.lines]
        if self.problems:
            out.append("verdict: NOT a valid mesh certificate")
            out.extend(f"  - {p}" for p in self.problems)
        else:
            out.append("verdict: valid mesh certificate")
        return "\n".join(out)


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """All URI subject alternative names of a certificate or CSR (empty if it has no SAN extension).
    (The data plane reads its certificates without `cryptography`: `mesh.secrets.x509`.)"""
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The one workload identity a leaf certificate carries, or `IdentityError`."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise IdentityError(f"certificate carries {len(uris)} URI SANs; a workload certificate has exactly one")
    return SpiffeId.parse(uris[0])


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty)"


def _key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _duration(delta: datetime.timedelta) -> str:
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _usages(cert: x509.Certificate) -> str:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "(no extended key usage)"
    names = {ExtendedKeyUsageOID.SERVER_AUTH: "server", ExtendedKeyUsageOID.CLIENT_AUTH: "client"}
    return ", ".join(names.get(o, o.dotted_string) for o in eku)


def explain(
    certs: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate] | None,
    *,
    now: datetime.datetime | None = None,
    root_source: str = "the mesh root",
    roots_missing_reason: str | None = None,
) -> Explanation:
    """Explain `certs[0]` (the others are its chain, as the CA returns it: root last is fine)."""
    now = now or datetime.datetime.now(datetime.UTC)
    leaf = certs[0]
    ex = Explanation()
    try:
        identity = str(identity_of(leaf))
    except IdentityError as exc:
        identity = ", ".join(uri_sans(leaf)) or "(none)"
        ex.problems.append(str(exc))
    ex.lines.append(("identity", identity))
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        others = [n for n in sans if not isinstance(n, x509.UniformResourceIdentifier)]
        if others:
            ex.lines.append(("other SANs", ", ".join(str(n.value) for n in others)))
            ex.problems.append("workload certificates carry only a URI SAN")
    except x509.ExtensionNotFound:
        pass
    ex.lines.append(("subject", _name(leaf.subject)))
    ex.lines.append(("issuer", _name(leaf.issuer)))
    ex.lines.append(("serial", f"{leaf.serial_number:x}"))
    ex.lines.append(("key", _key(leaf)))
    ex.lines.append(("usage", _usages(leaf)))
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < nb:
        state = f"NOT YET VALID (starts in {_duration(nb - now)})"
        ex.problems.append("certificate is not valid yet")
    elif now >= na:
        state = f"EXPIRED {_duration(now - na)} ago"
        ex.problems.append("certificate has expired")
    else:
        state = f"expires in {_duration(na - now)} (lifetime {_duration(na - nb)})"
    ex.lines.append(("valid", f"{nb.isoformat()} to {na.isoformat()}, {state}"))

    if roots is None:
        ex.lines.append(("chain", f"not checked: {roots_missing_reason or 'no mesh root given'}"))
        ex.problems.append("chain to the mesh root not checked")
        return ex
    intermediates = [c for c in certs[1:] if c not in roots]
    path = " -> ".join([identity, *(_name(c.subject) for c in intermediates)])
    verifier = verification.PolicyBuilder().store(verification.Store(list(roots))).time(now).build_client_verifier()
    try:
        verified = verifier.verify(leaf, intermediates)
        root = verified.chain[-1]
        ex.lines.append(("chain", f"{path} -> {_name(root.subject)}: verified against {root_source}"))
    except verification.VerificationError as exc:
        ex.lines.append(("chain", f"{path}: does NOT chain to {root_source} ({exc})"))
        ex.problems.append(f"certificate does not chain to {root_source}")
    return ex
