"""The synchronous gRPC client of the CA's `CreateCertificate` (run it in a thread from trio).

The channel is TLS to the control plane, trusting the mesh root; the caller's token goes in
`authorization: Bearer`.  A node agent passes `impersonate=` to ask on behalf of a pod on its node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
        root_pem: str | bytes,
        token: str | Callable[[], str],
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """`target` is `host:port`; `server_name` overrides the name checked in the CA's certificate."""
        self.target = target
        self.timeout = timeout
        self._token = token if callable(token) else (lambda: token)
        root = root_pem.encode() if isinstance(root_pem, str) else root_pem
        options: list[tuple[str, str | int]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=root), options=options
        )
        self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def create_certificate(
        self, csr_pem: str, *, ttl_seconds: int = 0, impersonate: SpiffeId | None = None
    ) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        if impersonate is not None:
            request.metadata.update({IMPERSONATED_IDENTITY: impersonate.uri})
        metadata = (("authorization", f"Bearer {self._token()}"),)
        try:
            response = self._stub.CreateCertificate(request, metadata=metadata, timeout=self.timeout)
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
        self._channel.close()

    def __enter__(self) -> CAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
