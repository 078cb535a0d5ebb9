"""The synchronous gRPC client of the CA's `CreateCertificate` (run it in a thread from trio).

Calls are TLS to the control plane over `mesh.grpcwire` (not grpcio), trusting the mesh root, on a
connection kept a few seconds for the next call; the caller's token goes in `authorization: Bearer`.  A node agent passes `impersonate=` to ask on behalf of
a pod on its node.  Both may be callables read on every call (the token file a kubelet refreshes, the
trust bundle of a `mesh.secrets.bundle.TrustBundle`): when the roots change, the next call dials with them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from google.protobuf.message import DecodeError

from mesh import grpcwire
from mesh.identity import IMPERSONATED_IDENTITY, SpiffeId
from mesh.proto import ca_pb2
from mesh.secrets.errors import CertificateRequestError

METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
MAX_MESSAGE = 4 * 1024 * 1024

# Refusals that will not change by asking again with the same request.
_PERMANENT = {"INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"}


class CertificateSigner(Protocol):
    """What the secret manager needs from a CA: sign this CSR (blocking)."""

    def create_certificate(
        self, csr_pem: str, *, ttl_seconds: int = 0, impersonate: SpiffeId | None = None
    ) -> list[str]: ...


class CAClient:
    """A `CertificateSigner` over gRPC.  Thread-safe; `close()` when done."""

    def __init__(
        self,
        target: str,
        root_pem: str | bytes | Callable[[], bytes],
        token: str | Callable[[], str],
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """`target` is `host:port`; `server_name` overrides the name checked in the CA's certificate."""
        self.target = target
        self.timeout = timeout
        self._token = token if callable(token) else (lambda: token)
        if callable(root_pem):
            self._roots = root_pem
        else:
            fixed = root_pem.encode() if isinstance(root_pem, str) else root_pem
            self._roots = lambda: fixed
        self.server_name = server_name
        self._lock = threading.Lock()
        self._channel: grpcwire.Channel | None = None  # for the roots last read (keeps a connection)

    def _current_channel(self) -> grpcwire.Channel:
        roots = self._roots()
        with self._lock:
            if self._channel is None or self._channel.security.root_pem != roots:
                if self._channel is not None:
                    self._channel.close()  # calls still running on it finish first
                security = grpcwire.Security(root_pem=roots, server_name=self.server_name)
                self._channel = grpcwire.Channel(self.target, security, max_message=MAX_MESSAGE)
            return self._channel

    def create_certificate(
        self, csr_pem: str, *, ttl_seconds: int = 0, impersonate: SpiffeId | None = None
    ) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        if impersonate is not None:
            request.metadata.update({IMPERSONATED_IDENTITY: impersonate.uri})
        metadata = (("authorization", f"Bearer {self._token()}"),)
        try:
            answer = self._current_channel().unary(METHOD, request.SerializeToString(), timeout=self.timeout,
                                                   metadata=metadata)
            response = ca_pb2.IstioCertificateResponse.FromString(answer)
        except grpcwire.GrpcError as exc:
            raise CertificateRequestError(
                f"CA at {self.target} answered {exc.code}: {exc.details}",
                code=exc.code,
                retryable=exc.code not in _PERMANENT,
            ) from None
        except DecodeError as exc:
            raise CertificateRequestError(
                f"CA at {self.target} answered with a message that is not an IstioCertificateResponse: {exc}",
                code="INTERNAL", retryable=True,
            ) from None
        return list(response.cert_chain)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None

    def __enter__(self) -> CAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
