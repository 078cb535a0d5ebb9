"""The roots a process trusts, from a file that is replaced while the process runs.

The mesh's trust bundle (`root-cert.pem`, on Kubernetes the ConfigMap `istio-ca-root-cert` mounted into
the pod) changes when the CA's root is rotated: a new root is added, later the old one removed.  A
`TrustBundle` made from a file notices (a `stat` per look, the file read again only when it changed) and
keeps the last good content when the file is unreadable or holds no certificate, so a half-made or broken
file never takes the mesh's trust away.

    bundle = TrustBundle.from_file(opts.root_cert)
    CAClient(target, bundle.pem, token)       # gRPC channels dial with the current roots
    SecretManager(signer, bundle)             # rebuilds its TLS contexts when `bundle.version` changes

Thread-safe: gRPC threads and the trio thread read it.  By convention the bundle lists the root the CA
signs with first (`ca.authority`); the secret manager renews certificates that chain to another root when
the bundle changes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from mesh.secrets.errors import InvalidCertificateError, SecretsError
from mesh.secrets.svid import load_trust_bundle
from mesh.secrets.x509 import Certificate

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class TrustBundle:
    """The current roots: fixed (`TrustBundle(pem)`) or read from a file (`from_file`) again when it changes."""

    def __init__(self, pem: str | bytes, *, path: Path | None = None) -> None:
        data = pem.encode() if isinstance(pem, str) else pem
        self._lock = threading.Lock()
        self._certs = load_trust_bundle(data)
        self._pem = data
        self._path = path
        self._seen = _signature(path) if path is not None else None
        self.version = 1  # grows by one each time the roots change

    @classmethod
    def from_file(cls, path: Path | str) -> TrustBundle:
        """The bundle in `path`; `SecretsError` if it cannot be read now (a process cannot start without one)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SecretsError(f"{path}: cannot read the mesh's root certificates ({exc.strerror})") from None
        try:
            return cls(data, path=path)
        except InvalidCertificateError as exc:
            raise SecretsError(f"{path}: {exc}") from None

    @property
    def path(self) -> Path | None:
        return self._path

    def refresh(self) -> bool:
        """Read the file again if it changed; True if the roots changed."""
        if self._path is None:
            return False
        signature = _signature(self._path)
        with self._lock:
            if signature is None or signature == self._seen:
                return False
            self._seen = signature
            try:
                data = self._path.read_bytes()
                certs = load_trust_bundle(data)
            except (OSError, InvalidCertificateError) as exc:
                log.warning("%s: keeping the previous trust bundle: %s", self._path, exc)
                return False
            if certs == self._certs:
                return False
            self._certs, self._pem = certs, data
            self.version += 1
        log.info("%s: the trust bundle changed: %d root(s)", self._path, len(certs))
        return True

    def pem(self) -> bytes:
        """The current roots in PEM (a look at the file first)."""
        self.refresh()
        with self._lock:
            return self._pem

    def certs(self) -> tuple[Certificate, ...]:
        """The current roots (a look at the file first), the CA's signing root first by convention."""
        self.refresh()
        with self._lock:
            return self._certs
