"""The synchronous gRPC client of the CA's `CreateCertificate` (run it in a thread from trio).

The channel is TLS to the control plane, trusting the mesh root; the caller's token goes in
`authorization: Bearer`.  A node agent passes `impersonate=` to ask on behalf of a pod on its node.
Both may be callables read on every call (the token file a kubelet refreshes, the trust bundle of a
`mesh.secrets.bundle.TrustBundle`): when the roots change, the next call dials a new channel with them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from mesh.identity import IMPERSONATED_IDENTITY, SpiffeId
from mesh.proto import ca_pb2, ca_pb2_grpc
from mesh.secrets.errors import CertificateRequestError

# Refusals that will not change by asking again with the same request.
_PERMANENT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}


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
        self._options: list[tuple[str, str | int]] = []
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._lock = threading.Lock()
        self._dialled: bytes | None = None
        self._channel: grpc.Channel | None = None
        self._previous: grpc.Channel | None = None  # kept open for calls still running on it
        self._stub: Any = None

    def _current_stub(self) -> Any:
        roots = self._roots()
        with self._lock:
            if roots != self._dialled:
                if self._previous is not None:
                    self._previous.close()
                self._previous = self._channel
                self._channel = grpc.secure_channel(
                    self.target, grpc.ssl_channel_credentials(root_certificates=roots), options=self._options
                )
                self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)  # type: ignore[no-untyped-call]
                self._dialled = roots
            return self._stub

    def create_certificate(
        self, csr_pem: str, *, ttl_seconds: int = 0, impersonate: SpiffeId | None = None
    ) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        if impersonate is not None:
            request.metadata.update({IMPERSONATED_IDENTITY: impersonate.uri})
        metadata = (("authorization", f"Bearer {self._token()}"),)
        stub = self._current_stub()
        try:
            response = stub.CreateCertificate(request, metadata=metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CertificateRequestError(
                f"CA at {self.target} answered {code.name}: {details}",
                code=code.name,
                retryable=code not in _PERMANENT,
            ) from None
        return list(response.cert_chain)

    def close(self) -> None:
        with self._lock:
            for channel in (self._previous, self._channel):
                if channel is not None:
                    channel.close()
            self._previous = self._channel = None
            self._dialled = None

    def __enter__(self) -> CAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
