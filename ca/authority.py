"""The CA's signing key and chain, and leaf signing.

The CA keeps its material in one directory with the file names Istio uses for plugged-in CAs, so an
operator can replace a generated root with their own intermediate by dropping four files in place:

    ca-cert.pem     the certificate that signs workload certificates (the root itself, or an intermediate)
    ca-key.pem      its private key (mode 0600)
    root-cert.pem   the mesh root every workload trusts
    cert-chain.pem  ca-cert.pem and any intermediates above it, up to (optionally including) the root

On first start, when the directory has none of these, a self-signed ECDSA P-256 root is generated and
written there in the same layout (ca-cert = root-cert = cert-chain).  Either way the CA then signs leaf
certificates whose chain is returned leaf first, root last.

`root-cert.pem` is the trust bundle: every root that workloads trust, the one the CA's chain ends in
first.  It holds two while the root is rotated (`ca.rotation`), which also swaps the signing key and
chain in place (`use`, `trust`): the CA is never restarted for it.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.errors import CAStoreError, SigningError, TTLError
from mesh import defaults
from mesh.files import write_atomic
from mesh.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, check_trust_domain
from mesh.secrets.openssl import PublicKey

CA_CERT = "ca-cert.pem"
CA_KEY = defaults.CA_KEY_FILE
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
CA_FILES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)

DEFAULT_TTL = datetime.timedelta(hours=24)
DEFAULT_MAX_TTL = datetime.timedelta(days=7)
ROOT_TTL = datetime.timedelta(days=3650)
# Leaf certificates start a little in the past so that a peer whose clock lags ours accepts them; the
# backdate is at most a tenth of the lifetime so that short-lived test certificates stay meaningful.
MAX_BACKDATE = datetime.timedelta(seconds=60)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_pem_certs(data: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; `CAStoreError` naming `what` if there is none or it is bad."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAStoreError(f"{what}: not a PEM certificate bundle ({exc})") from None
    if not certs:
        raise CAStoreError(f"{what}: no certificate found")
    return certs


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _is_issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


@dataclass(frozen=True)
class IssuedChain:
    """A signed leaf and its chain.  `pems` is what the gRPC API returns: leaf first, root last."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def pems(self) -> list[str]:
        return [to_pem(self.leaf), *(to_pem(c) for c in self.chain)]


@dataclass(frozen=True)
class _Material:
    signing_key: SigningKey
    chain: tuple[x509.Certificate, ...]  # the signing certificate up to its root, root last
    bundle: tuple[x509.Certificate, ...]  # the roots workloads trust: the chain's root first


def _bundle_with(root: x509.Certificate, bundle: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """`bundle` with `root` first (added if missing), each root once."""
    rest = [c for c in bundle if c != root]
    return (root, *dict.fromkeys(rest))


class CertificateAuthority:
    """Signs leaf certificates with one key.  Thread-safe: its key, chain and trust bundle are one
    immutable value, replaced as a whole (`use`, `trust`) when the root is rotated."""

    def __init__(
        self,
        signing_key: SigningKey,
        chain: Sequence[x509.Certificate],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        default_ttl: datetime.timedelta = DEFAULT_TTL,
        max_ttl: datetime.timedelta = DEFAULT_MAX_TTL,
        bundle: Sequence[x509.Certificate] = (),
    ) -> None:
        """`chain` runs from the signing certificate up to the root, root last (one element for a root CA);
        `bundle`: other roots workloads trust besides the chain's (during a root rotation)."""
        if default_ttl <= datetime.timedelta(0) or max_ttl < default_ttl:
            raise CAStoreError(f"CA lifetimes out of order: default {default_ttl}, maximum {max_ttl}")
        self.trust_domain = check_trust_domain(trust_domain)
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.generation = 0  # grows by one each time the signing key and chain are replaced
        self._material = self._checked(signing_key, chain, bundle)

    @staticmethod
    def _checked(signing_key: SigningKey, chain: Sequence[x509.Certificate],
                 bundle: Sequence[x509.Certificate]) -> _Material:
        if not chain:
            raise CAStoreError("the CA needs at least its signing certificate")
        _check_chain(signing_key, list(chain))
        for root in bundle:
            if not _is_ca(root) or not _is_issued_by(root, root):
                raise CAStoreError(f"{ROOT_CERT}: {root.subject.rfc4514_string()!r} is not a self-signed CA root")
        return _Material(signing_key, tuple(chain), _bundle_with(chain[-1], bundle))

    def use(self, signing_key: SigningKey, chain: Sequence[x509.Certificate],
            bundle: Sequence[x509.Certificate] = ()) -> None:
        """Sign with `signing_key` and `chain` from now on, trusting `bundle` besides the chain's root."""
        material = self._checked(signing_key, chain, bundle)
        self._material = material
        self.generation += 1

    def trust(self, bundle: Sequence[x509.Certificate]) -> None:
        """The trust bundle is now the chain's root and `bundle` (the signing key is unchanged)."""
        m = self._material
        self._material = self._checked(m.signing_key, m.chain, bundle)

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, ca_dir: str | os.PathLike[str], **kwargs: object) -> CertificateAuthority:
        """Load the CA from `ca_dir`, generating and writing a new root there if the directory has none.

        A directory holding some but not all of the CA files is an error (never silently replaced).
        Keyword arguments go to the constructor (`trust_domain`, `default_ttl`, `max_ttl`).
        """
        path = Path(ca_dir)
        present = [name for name in CA_FILES if (path / name).exists()]
        if not present:
            trust_domain = str(kwargs.get("trust_domain", DEFAULT_TRUST_DOMAIN))
            key, root = generate_root(trust_domain)
            write_ca_dir(path, key, [root])
        return cls.load(path, **kwargs)

    @classmethod
    def load(cls, ca_dir: str | os.PathLike[str], **kwargs: object) -> CertificateAuthority:
        """Load an Istio-style `cacerts` directory (see the module docstring)."""
        path = Path(ca_dir)
        missing = [name for name in (CA_CERT, CA_KEY, ROOT_CERT) if not (path / name).is_file()]
        if missing:
            raise CAStoreError(
                f"{path}: missing {', '.join(missing)}; a CA directory holds {', '.join(CA_FILES)} "
                "(or is empty, and a root is generated)"
            )
        try:
            key_bytes = (path / CA_KEY).read_bytes()
            ca_cert = load_pem_certs((path / CA_CERT).read_bytes(), str(path / CA_CERT))[0]
            bundle = load_pem_certs((path / ROOT_CERT).read_bytes(), str(path / ROOT_CERT))
            chain_file = path / CERT_CHAIN
            listed = load_pem_certs(chain_file.read_bytes(), str(chain_file)) if chain_file.is_file() else []
        except OSError as exc:
            raise CAStoreError(f"{path}: cannot read the CA files: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as exc:
            raise CAStoreError(f"{path / CA_KEY}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CAStoreError(f"{path / CA_KEY}: only ECDSA and RSA CA keys are supported")
        chain = [ca_cert] + [c for c in listed if c != ca_cert]
        if not _is_issued_by(chain[-1], chain[-1]):  # the chain stops below its root: the bundle has it
            top = next((r for r in bundle if _is_issued_by(chain[-1], r)), bundle[0])
            chain.append(top)
        elif chain[-1] not in bundle:
            raise CAStoreError(f"{path}: the CA's chain ends in a root that {ROOT_CERT} does not hold "
                               f"({chain[-1].subject.rfc4514_string()!r}): check {CERT_CHAIN} and {ROOT_CERT}")
        return cls(key, chain, bundle=bundle, **kwargs)  # type: ignore[arg-type]

    # -- what others read ---------------------------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        return self._material.signing_key

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self._material.chain

    @property
    def signing_cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def root(self) -> x509.Certificate:
        """The root the CA's chain ends in: the one that signs, through its chain."""
        return self.chain[-1]

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        """Every root workloads trust, the signing root first."""
        return self._material.bundle

    @property
    def root_pem(self) -> str:
        """The trust bundle in PEM: what `root-cert.pem` holds and clients trust."""
        return "".join(to_pem(c) for c in self.bundle)

    def resolve_ttl(self, requested_seconds: int) -> datetime.timedelta:
        """The lifetime for a request: 0 means the default; above the maximum is refused."""
        if requested_seconds < 0:
            raise TTLError(f"validity_duration {requested_seconds}s is negative")
        if requested_seconds == 0:
            return self.default_ttl
        ttl = datetime.timedelta(seconds=requested_seconds)
        if ttl > self.max_ttl:
            raise TTLError(
                f"validity_duration {requested_seconds}s is above the CA's maximum of "
                f"{int(self.max_ttl.total_seconds())}s"
            )
        return ttl

    # -- signing ------------------------------------------------------------------------------------------

    def sign_workload(
        self,
        public_key: ec.EllipticCurvePublicKey | PublicKey,
        identity: SpiffeId,
        ttl: datetime.timedelta,
        *,
        now: datetime.datetime | None = None,
    ) -> IssuedChain:
        """A workload certificate: `identity` as its only SAN (a URI), client and server use.  The key may
        be a data-plane `PublicKey` (its SubjectPublicKeyInfo DER), as `mesh.secrets.svid` makes them."""
        if isinstance(public_key, PublicKey):
            try:
                loaded = serialization.load_der_public_key(public_key.der)
            except ValueError as exc:
                raise SigningError(f"the public key is not valid DER ({exc})") from None
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise SigningError("leaf keys must be ECDSA P-256")
            public_key = loaded
        if identity.trust_domain != self.trust_domain:
            raise SigningError(f"{identity} is outside this CA's trust domain {self.trust_domain}")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        return self.sign_leaf(public_key, sans, ttl, now=now)

    def sign_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        sans: Sequence[x509.GeneralName],
        ttl: datetime.timedelta,
        *,
        now: datetime.datetime | None = None,
    ) -> IssuedChain:
        """Sign a leaf with exactly `sans`.  Callers decide which names are allowed (see `ca.policy`)."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise SigningError("leaf keys must be ECDSA P-256")
        if not sans:
            raise SigningError("a leaf certificate needs at least one subject alternative name")
        material = self._material  # one key and chain for the whole signing, whatever a rotation does meanwhile
        now = now or _now()
        backdate = min(MAX_BACKDATE, ttl / 10)
        not_before = now - backdate
        issuer = material.chain[0]
        not_after = min(now + ttl, issuer.not_valid_after_utc)
        if not_after <= now:
            raise SigningError("the CA's signing certificate has expired: replace the CA files")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(material.signing_key.public_key()),
                critical=False,
            )
        )
        try:
            leaf = builder.sign(material.signing_key, hashes.SHA256())
        except (ValueError, TypeError) as exc:
            raise SigningError(f"signing failed: {exc}") from exc
        return IssuedChain(leaf, material.chain)


def _serial() -> int:
    # 159 random bits: positive, unique, and within the 20-octet limit of RFC 5280.
    return secrets.randbits(159) | 1


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _check_chain(key: SigningKey, chain: list[x509.Certificate]) -> None:
    """The key matches the signing certificate, each certificate is issued by the next, the last is a
    self-signed root, all of them are CAs, and the signing certificate is still valid."""
    signing = chain[0]
    if signing.public_key() != key.public_key():
        raise CAStoreError(f"{CA_KEY} does not match {CA_CERT}: the key signs for a different certificate")
    for cert in chain:
        if not _is_ca(cert):
            raise CAStoreError(f"certificate {cert.subject.rfc4514_string()!r} in the CA chain is not a CA")
    for child, parent in zip(chain, chain[1:], strict=False):
        if not _is_issued_by(child, parent):
            raise CAStoreError(
                f"CA chain is broken: {child.subject.rfc4514_string()!r} is not signed by "
                f"{parent.subject.rfc4514_string()!r} (check {CERT_CHAIN} and {ROOT_CERT})"
            )
    if not _is_issued_by(chain[-1], chain[-1]):
        raise CAStoreError(f"{ROOT_CERT} is not a self-signed root")
    if signing.not_valid_after_utc <= _now():
        raise CAStoreError(f"{CA_CERT} expired at {signing.not_valid_after_utc.isoformat()}")


def generate_root(
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    ttl: datetime.timedelta = ROOT_TTL,
    now: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed ECDSA P-256 root for `trust_domain`."""
    return _ca_cert(trust_domain, "mesh root CA", None, ttl=ttl, now=now)


def generate_intermediate(
    parent_key: SigningKey,
    parent: x509.Certificate,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    ttl: datetime.timedelta = datetime.timedelta(days=365),
    now: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new intermediate CA signed by `parent` (how an operator would make plugged-in cacerts)."""
    return _ca_cert(trust_domain, "mesh intermediate CA", (parent_key, parent), ttl=ttl, now=now)


def _ca_cert(
    trust_domain: str,
    common_name: str,
    parent: tuple[SigningKey, x509.Certificate] | None,
    *,
    ttl: datetime.timedelta,
    now: datetime.datetime | None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, check_trust_domain(trust_domain)),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    issuer_key: SigningKey = key if parent is None else parent[0]
    issuer_name = subject if parent is None else parent[1].subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return key, builder.sign(issuer_key, hashes.SHA256())


def write_ca_dir(path: Path, key: SigningKey, chain: Sequence[x509.Certificate],
                 bundle: Sequence[x509.Certificate] = ()) -> None:
    """Write a CA directory: `chain` runs from the signing certificate to the root; `root-cert.pem` gets
    that root first, then the other roots of `bundle`."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path / CA_KEY, key_pem, 0o600)
    write_atomic(path / CA_CERT, to_pem(chain[0]).encode(), 0o644)
    write_atomic(path / CERT_CHAIN, "".join(to_pem(c) for c in chain).encode(), 0o644)
    write_bundle(path, _bundle_with(chain[-1], bundle))


def write_bundle(path: Path, bundle: Sequence[x509.Certificate]) -> None:
    """Replace the CA directory's trust bundle (`root-cert.pem`), atomically."""
    write_atomic(path / ROOT_CERT, "".join(to_pem(c) for c in bundle).encode(), 0o644)
