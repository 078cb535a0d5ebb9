"""Errors of the client-side secret manager."""

from __future__ import annotations

from mesh.errors import MeshError


class SecretsError(MeshError):
    """A certificate could not be obtained or used."""


class CertificateRequestError(SecretsError):
    """The CA refused or could not be reached.  `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, code: str = "UNKNOWN", retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class InvalidCertificateError(SecretsError):
    """The CA returned something that is not a valid certificate for the key and identity asked for."""


class PeerIdentityError(SecretsError):
    """The TLS peer's certificate does not carry an identity this side accepts."""


class NoCertificateError(SecretsError):
    """No certificate is held (yet) for the identity asked about."""
