"""The CA's errors.  Each carries the gRPC status it maps to and a metrics `reason` label."""

from __future__ import annotations

import grpc

from mesh.errors import MeshError


class CAError(MeshError):
    """A request the CA refuses, or a CA that cannot work.  `str()` names the problem."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"


class CAStoreError(CAError):
    """The CA's key material on disk is missing, partial, unreadable or inconsistent."""

    reason = "ca_store"


class BadRequestError(CAError):
    """Malformed request fields: metadata of the wrong type, a lifetime out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "bad_request"


class CSRError(BadRequestError):
    """The CSR cannot be parsed, its signature does not verify, or it asks for a forbidden name."""

    reason = "bad_csr"


class SANError(BadRequestError):
    """The CSR's subject alternative names are not exactly one URI SAN for an allowed identity."""

    reason = "bad_san"


class TTLError(BadRequestError):
    """The requested lifetime is above the CA's maximum (or negative)."""

    reason = "ttl"


class OversizedRequestError(CAError):
    """The request is larger than the CA accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "oversized"


class AuthenticationError(CAError):
    """No token, or a token that is expired, for another audience, or not signed by a trusted key."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class AuthenticationUnavailableError(CAError):
    """The caller's credentials could not be checked (the Kubernetes API server failed or did not answer
    a TokenReview in time): refused, since nothing is known about the caller (fail closed)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "authentication_unavailable"


class PermissionDeniedError(CAError):
    """An authenticated caller asking for an identity it may not have."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class SigningError(CAError):
    """Signing failed inside the CA (a bug or a broken key), not because of the request."""

    reason = "signing"
