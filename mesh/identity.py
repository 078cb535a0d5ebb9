"""SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

The one place that parses, prints and extracts identities, shared by the CA (what may be signed), the
secret manager (what to ask for) and the data plane (who is on the other end of a TLS connection).
Parsing is strict: a string either is exactly one well-formed workload identity or is refused with a
message that says which part is wrong.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from mesh import defaults
from mesh.errors import MeshError
from mesh.secrets.errors import InvalidCertificateError
from mesh.secrets.x509 import Certificate

DEFAULT_TRUST_DOMAIN = defaults.TRUST_DOMAIN
SCHEME = "spiffe://"

# A trust domain is a DNS-like name: lower-case letters, digits, dots, dashes and underscores (SPIFFE ID
# spec section 2.1).  Namespaces and service accounts follow Kubernetes' DNS-1123 subdomain rules, which
# are stricter than what SPIFFE path segments allow.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


# The metadata key of Istio's certificate API under which a node agent names the identity it asks for.
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"


class IdentityError(MeshError):
    """A string or certificate that does not carry a valid workload identity."""


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain name, else raise `IdentityError`."""
    if not _TRUST_DOMAIN_RE.match(trust_domain) or trust_domain.strip(".") != trust_domain:
        raise IdentityError(
            f"invalid trust domain {trust_domain!r}: use lower-case letters, digits, '.', '-' and '_'"
        )
    return trust_domain


def _check_name(kind: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise IdentityError(
            f"invalid {kind} {value!r}: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return value


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity.  `str(x)` is its URI; `SpiffeId.parse(str(x)) == x`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_name("namespace", self.namespace)
        _check_name("service account", self.service_account)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else raises `IdentityError`."""
        if not isinstance(uri, str):
            raise IdentityError(f"identity must be a string, not {type(uri).__name__}")
        if not uri.startswith(SCHEME):
            raise IdentityError(f"identity {uri!r} is not a SPIFFE ID: it must start with {SCHEME!r}")
        rest = uri[len(SCHEME) :]
        trust_domain, sep, path = rest.partition("/")
        if not sep:
            raise IdentityError(f"identity {uri!r} has no path: expected {SCHEME}<td>/ns/<ns>/sa/<sa>")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError(
                f"identity {uri!r} is not a workload identity: expected {SCHEME}<td>/ns/<ns>/sa/<sa>"
            )
        return cls(trust_domain, parts[1], parts[3])

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def identity_of(cert: Certificate) -> SpiffeId:
    """The one workload identity a leaf certificate carries, or `IdentityError`."""
    uris = cert.uri_sans
    if len(uris) != 1:
        raise IdentityError(f"certificate carries {len(uris)} URI SANs; a workload certificate has exactly one")
    return SpiffeId.parse(uris[0])


@functools.lru_cache(maxsize=128)
def identity_of_der(der: bytes) -> SpiffeId:
    """`identity_of` for a DER-encoded certificate (what `ssl.SSLSocket.getpeercert(True)` returns).

    Remembered for the last 128 certificates: each TLS handshake checks its peer, and a node sees the
    same few peer certificates again and again until they are renewed (a hit ~0.3 us, a read ~14 us)."""
    try:
        cert = Certificate.from_der(der)
    except InvalidCertificateError as exc:
        raise IdentityError(f"peer certificate is not valid DER: {exc}") from None
    return identity_of(cert)
