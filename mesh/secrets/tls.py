"""TLS contexts for the mesh's mutual TLS (HBONE and friends), and the SPIFFE peer check.

Both sides use TLS 1.3 only, ALPN `h2`, present their SVID, and require the peer's certificate to chain
to the mesh root.  The stdlib `ssl` module cannot check URI SANs, so host-name checking is off and
`check_peer()` must be called right after the handshake, before any application byte is trusted:

    ctx = manager.client_context(my_identity)          # fetch per connection: picks up renewals
    tls = ctx.wrap_socket(sock)                        # or an SSLObject over a memory BIO
    peer = check_peer(tls, allowed={expected_identity})  # raises PeerIdentityError: close the socket

A renewed certificate means a new `SSLContext`; connections made with the old one keep working.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from mesh.identity import IdentityError, SpiffeId, identity_of_der
from mesh.secrets.errors import PeerIdentityError
from mesh.secrets.svid import Svid

ALPN_H2 = "h2"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@contextmanager
def in_memory_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths `ssl` can read `blobs` from without them touching a disk: anonymous memory files where the
    kernel has them, otherwise a private temporary directory removed at once."""
    if hasattr(os, "memfd_create"):
        fds: list[int] = []
        try:
            for i, blob in enumerate(blobs):
                fd = os.memfd_create(f"svid-{i}", os.MFD_CLOEXEC)
                fds.append(fd)
                _write_all(fd, blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="svid-") as tmp:  # pragma: no cover - non-Linux fallback
        os.chmod(tmp, 0o700)
        paths = []
        for i, blob in enumerate(blobs):
            path = Path(tmp) / f"{i}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            paths.append(str(path))
        yield paths


class DirectSSLObject(ssl.SSLObject):
    """An `SSLObject` (TLS over memory BIOs, as uvloop's transports and our TLS sockets run it) whose
    `read`, `write` and `pending` are the C methods of the OpenSSL connection it wraps.  `SSLObject`'s own
    are Python functions that only pass their arguments on (a `read` with or without a buffer, as the
    C one takes them), and a relay calls them for every record it sends or reads.  uvloop binds these
    three once per connection, so they are set on the object as it is made."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        obj: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        raw = obj._sslobj  # type: ignore[attr-defined]
        obj.read = raw.read  # type: ignore[method-assign]
        obj.write = raw.write  # type: ignore[method-assign]
        obj.pending = raw.pending  # type: ignore[method-assign]
        return obj


def _base_context(protocol: int, svid: Svid, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=svid.trust_bundle_pem())
    with in_memory_files(svid.chain_pem(), svid.key_pem()) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(svid: Svid, *, alpn: Sequence[str] = (ALPN_H2,)) -> ssl.SSLContext:
    """A server context presenting `svid` and requiring a client certificate from the mesh root."""
    return _base_context(ssl.PROTOCOL_TLS_SERVER, svid, alpn)


def client_context(svid: Svid, *, alpn: Sequence[str] = (ALPN_H2,)) -> ssl.SSLContext:
    """A client context presenting `svid`; the server's identity is checked by `check_peer()`."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, svid, alpn)
    ctx.check_hostname = False  # SPIFFE IDs are URI SANs: check_peer() does this job
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def https_server_context(chain_pem: bytes, key_pem: bytes, *, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """A server context for plain HTTPS (TLS 1.2 or later, no client certificate asked for) presenting
    `chain_pem` (leaf first) with `key_pem`; the key is read from memory, never from a disk."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with in_memory_files(chain_pem, key_pem) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class PeerCertSource(Protocol):
    """`ssl.SSLSocket`, `ssl.SSLObject`, or `trio.SSLStream` (which forwards `getpeercert`)."""

    def getpeercert(self, binary_form: bool) -> Any: ...


def check_peer(
    tls: PeerCertSource,
    *,
    allowed: Collection[SpiffeId] | None = None,
    trust_domain: str | None = None,
) -> SpiffeId:
    """The peer's identity after a completed handshake, if it is acceptable; else `PeerIdentityError`.

    `allowed`: the peer must be one of these identities (a client checking its server).
    `trust_domain`: the peer must be in this trust domain (a server checking its client).
    At least one must be given; with both, both must hold.
    """
    if allowed is None and trust_domain is None:
        raise ValueError("check_peer needs allowed identities or a trust domain")
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    try:
        peer = identity_of_der(der)
    except IdentityError as exc:
        raise PeerIdentityError(f"peer certificate: {exc}") from None
    if trust_domain is not None and peer.trust_domain != trust_domain:
        raise PeerIdentityError(f"peer {peer} is outside trust domain {trust_domain!r}")
    if allowed is not None and peer not in allowed:
        expected = ", ".join(sorted(str(a) for a in allowed)) or "nobody"
        raise PeerIdentityError(f"peer is {peer}, expected {expected}")
    return peer
