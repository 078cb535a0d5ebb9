"""`IstioCertificateService/CreateCertificate`: the request pipeline and its gRPC servicers.

`CertificateService.create_certificate()` does the whole job on plain values (request fields and the
caller's metadata in, PEM chain out, a `CAError` carrying a gRPC status otherwise) so it is tested and
reused without a server.  The servicer only translates (`AsyncCertificateServicer`, for
`grpc.aio.server()`); `ca.server` hosts it with `add_to_server()`.

Order of checks: size, then authentication (nothing is parsed for an unauthenticated caller beyond the
metadata), then request fields, then the CSR, then the authorization decision, then signing.  Every
request is counted, and every refusal is counted by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import struct_pb2

from ca.auth import Authenticator
from ca.authority import CertificateAuthority
from ca.csr import check_csr
from ca.errors import BadRequestError, CAError, OversizedRequestError, SigningError
from ca.metrics import CAMetrics
from ca.pods import PodLocator
from ca.policy import allowed_identity
from mesh.identity import IMPERSONATED_IDENTITY, IdentityError, SpiffeId
from mesh.proto import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

# A request is a CSR (under 1 KiB) and a little metadata.  Requests above this are refused by the
# servicer (counted, RESOURCE_EXHAUSTED); `ca.server.MAX_TRANSPORT_BYTES` is the hard limit gRPC enforces
# before the servicer sees anything (those are refused by gRPC itself and not counted).
MAX_REQUEST_BYTES = 64 * 1024


def metadata_dict(pairs: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """gRPC invocation metadata as lower-case keys to the first (text) value."""
    out: dict[str, str] = {}
    for key, value in pairs or ():
        if isinstance(value, bytes):
            continue
        out.setdefault(key.lower(), value)
    return out


def impersonated_identity(metadata: struct_pb2.Struct) -> SpiffeId | None:
    """`ImpersonatedIdentity` from the request's metadata Struct, if present; it must be a string ID."""
    if IMPERSONATED_IDENTITY not in metadata.fields:
        return None
    value = metadata.fields[IMPERSONATED_IDENTITY]
    kind = value.WhichOneof("kind")
    if kind != "string_value":
        raise BadRequestError(
            f"metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE ID, not a {_struct_kind(kind)}"
        )
    try:
        return SpiffeId.parse(value.string_value)
    except IdentityError as exc:
        raise BadRequestError(f"metadata {IMPERSONATED_IDENTITY}: {exc}") from None


def _struct_kind(kind: str | None) -> str:
    return {
        "null_value": "null",
        "number_value": "number",
        "bool_value": "boolean",
        "struct_value": "struct",
        "list_value": "list",
        None: "value with no kind",
    }.get(kind, str(kind))


class CertificateService:
    """Checks and signs certificate requests.  Thread-safe; one instance serves all requests."""

    def __init__(
        self,
        authority: CertificateAuthority,
        authenticator: Authenticator,
        pods: PodLocator,
        metrics: CAMetrics | None = None,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.authority = authority
        self.authenticator = authenticator
        self.pods = pods
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        if metrics is not None:
            metrics.set_expiries(
                authority.root.not_valid_after_utc.timestamp(),
                authority.signing_cert.not_valid_after_utc.timestamp(),
            )

    def create_certificate(
        self, request: ca_pb2.IstioCertificateRequest, metadata: Mapping[str, str]
    ) -> list[str]:
        """The PEM chain (leaf first, root last) for `request`, or a `CAError`; counted either way."""
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.request()
        try:
            chain = self._create(request, metadata)
        except CAError as exc:
            if self.metrics is not None:
                self.metrics.refused(exc.reason)
            log.info("refused certificate request: %s", exc)
            raise
        except Exception as exc:  # a bug: still answer with a status, and count it
            log.exception("certificate signing failed")
            if self.metrics is not None:
                self.metrics.refused(SigningError.reason)
            raise SigningError(f"internal error while signing: {type(exc).__name__}") from exc
        if self.metrics is not None:
            self.metrics.issued(time.perf_counter() - started)
        return chain

    def _create(self, request: ca_pb2.IstioCertificateRequest, metadata: Mapping[str, str]) -> list[str]:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise OversizedRequestError(
                f"request is {size} bytes; the CA accepts at most {self.max_request_bytes} "
                "(a certificate request is one CSR of about 500 bytes)"
            )
        caller = self.authenticator.authenticate(metadata)
        impersonated = impersonated_identity(request.metadata)
        ttl = self.authority.resolve_ttl(request.validity_duration)
        csr = check_csr(request.csr)
        identity = allowed_identity(caller, impersonated, csr.identity, self.pods, self.authority.trust_domain)
        issued = self.authority.sign_workload(csr.public_key, identity, ttl)
        log.info("issued %s to %s until %s", identity, caller, issued.leaf.not_valid_after_utc.isoformat())
        return issued.pems


class AsyncCertificateServicer(ca_pb2_grpc.IstioCertificateServiceServicer):
    """For `grpc.aio.server()`: signing runs in the default executor so the event loop stays free."""

    def __init__(self, service: CertificateService) -> None:
        self.service = service

    async def CreateCertificate(  # type: ignore[override]  # noqa: N802
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        metadata = metadata_dict(context.invocation_metadata())  # type: ignore[arg-type]
        try:
            chain = await asyncio.get_running_loop().run_in_executor(
                None, self.service.create_certificate, request, metadata
            )
        except CAError as exc:
            await context.abort(exc.code, str(exc))
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


def add_to_server(server: grpc.aio.Server, servicer: AsyncCertificateServicer) -> None:
    """Register the CA service on a gRPC server (`ca.server.CAServer` does, with its receive limit)."""
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
