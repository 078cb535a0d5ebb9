"""The control plane's own serving certificate for :15012, and gRPC server credentials from it.

Choice: workload certificates carry only their SPIFFE URI SAN (enforced on every CSR), but this one is
not requested over the API; the CA process makes it for itself.  It carries the control plane's SPIFFE
ID (default `spiffe://<td>/ns/istio-system/sa/istiod`) *and* DNS/IP SANs for the addresses clients dial,
because gRPC's TLS client checks the target's host name against DNS/IP SANs and has no SPIFFE check of
its own.  Clients trust it through the mesh root (`root-cert.pem`), exactly like workload certificates.

The key is made in this process and never written to disk.  The certificate is renewed at half-life, and
at once when the CA's signing key or trust bundle changes (a root rotation, `ca.rotation`):
`server_credentials()` uses gRPC's dynamic credentials, which ask for the current certificate on each
new TLS handshake, so live connections are not dropped when it rotates.  `https_context()` does the same
for an `ssl` server (the admission webhook on :15017): its SNI callback, which OpenSSL calls on every
ClientHello, moves the handshake to a context made from the current certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authority import CertificateAuthority, to_pem
from mesh.identity import SpiffeId
from mesh.secrets.tls import https_server_context

CONTROL_PLANE_NAMESPACE = "istio-system"
CONTROL_PLANE_SERVICE_ACCOUNT = "istiod"
SERVING_TTL = datetime.timedelta(hours=24)


def control_plane_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)


def host_sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """DNS or IP SANs for the names and addresses clients use to reach the control plane."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


@dataclass(frozen=True)
class ServingCertificate:
    key_pem: bytes
    chain_pem: bytes  # leaf and intermediates (not the root), as TLS servers send it
    root_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime

    def renew_at(self) -> datetime.datetime:
        return self.not_before + (self.not_after - self.not_before) / 2


def issue_serving_certificate(
    authority: CertificateAuthority,
    hosts: Sequence[str],
    *,
    identity: SpiffeId | None = None,
    ttl: datetime.timedelta = SERVING_TTL,
) -> ServingCertificate:
    """A fresh key and a certificate for it with the control plane's identity and `hosts` as SANs."""
    identity = identity or control_plane_identity(authority.trust_domain)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri), *host_sans(hosts)]
    issued = authority.sign_leaf(key.public_key(), sans, ttl)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Send everything but the root: clients already trust it.
    sent = [issued.leaf, *issued.chain[:-1]]
    return ServingCertificate(
        key_pem=key_pem,
        chain_pem="".join(to_pem(c) for c in sent).encode(),
        root_pem=authority.root_pem.encode(),
        not_before=issued.leaf.not_valid_before_utc,
        not_after=issued.leaf.not_valid_after_utc,
    )


class RotatingServingCertificate:
    """Holds the current serving certificate and replaces it once past half-life (thread-safe)."""

    def __init__(
        self,
        authority: CertificateAuthority,
        hosts: Sequence[str],
        *,
        identity: SpiffeId | None = None,
        ttl: datetime.timedelta = SERVING_TTL,
    ) -> None:
        self._authority = authority
        self._hosts = tuple(hosts)
        self._identity = identity
        self._ttl = ttl
        self._lock = threading.Lock()
        self._current = self._issue()

    def _issue(self) -> ServingCertificate:
        self._generation, self._bundle = self._authority.generation, self._authority.bundle
        return issue_serving_certificate(self._authority, self._hosts, identity=self._identity, ttl=self._ttl)

    def _stale(self, now: datetime.datetime) -> bool:
        """Past half-life, or the CA changed its signing key or trust bundle (a root rotation)."""
        authority = self._authority
        return now >= self._current.renew_at() or authority.generation != self._generation \
            or authority.bundle != self._bundle

    @property
    def current(self) -> ServingCertificate:
        return self._current

    def refresh(self, now: datetime.datetime | None = None) -> bool:
        """Re-issue if past half-life or the CA's root changed; True if the certificate changed."""
        now = now or datetime.datetime.now(datetime.UTC)
        with self._lock:
            if not self._stale(now):
                return False
            self._current = self._issue()
            return True

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert = self._current
        return grpc.ssl_server_certificate_configuration([(cert.key_pem, cert.chain_pem)])

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before each handshake; None keeps the current configuration.
        return self._config() if self.refresh() else None


def server_credentials(
    authority: CertificateAuthority,
    hosts: Sequence[str],
    *,
    identity: SpiffeId | None = None,
    ttl: datetime.timedelta = SERVING_TTL,
) -> tuple[grpc.ServerCredentials, RotatingServingCertificate]:
    """TLS credentials for the control plane's gRPC server on :15012, and the rotating certificate
    behind them (read `.current.root_pem` to hand clients their trust anchor).

    Client certificates are not requested: callers authenticate with bearer tokens.
    """
    rotating = RotatingServingCertificate(authority, hosts, identity=identity, ttl=ttl)
    creds = grpc.dynamic_ssl_server_credentials(
        rotating._config(), rotating._fetch, require_client_authentication=False
    )
    return creds, rotating


class _HttpsContexts:
    """The `ssl` context of the current serving certificate, remade when it rotates (thread-safe)."""

    def __init__(self, rotating: RotatingServingCertificate) -> None:
        self._rotating = rotating
        self._lock = threading.Lock()
        self._cert = rotating.current
        self._ctx = self._make(self._cert)

    def _make(self, cert: ServingCertificate) -> ssl.SSLContext:
        ctx = https_server_context(cert.chain_pem, cert.key_pem)
        ctx.sni_callback = self._on_client_hello
        return ctx

    def current(self) -> ssl.SSLContext:
        self._rotating.refresh()
        cert = self._rotating.current
        with self._lock:
            if cert is not self._cert:
                self._cert, self._ctx = cert, self._make(cert)
            return self._ctx

    def _on_client_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                         ctx: ssl.SSLContext) -> None:
        current = self.current()
        if current is not ctx:
            conn.context = current


def https_context(
    authority: CertificateAuthority,
    hosts: Sequence[str],
    *,
    identity: SpiffeId | None = None,
    ttl: datetime.timedelta = SERVING_TTL,
) -> tuple[ssl.SSLContext, RotatingServingCertificate]:
    """An HTTPS server context presenting a serving certificate for `hosts` (renewed at half-life, see the
    module docstring), and the rotating certificate behind it."""
    rotating = RotatingServingCertificate(authority, hosts, identity=identity, ttl=ttl)
    return _HttpsContexts(rotating).current(), rotating
