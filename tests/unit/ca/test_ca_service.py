"""`CreateCertificate` over a real TLS gRPC server on loopback: issuance, and every bad input refused
with a status naming the problem, no certificate, and a count."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from ca_helpers import SLEEP, WEB, csr_pem, new_key
from cryptography import x509
from cryptography.x509 import verification
from prometheus_client import generate_latest

from ca.auth import NodeTokenIssuer
from ca.inspect import identity_of
from ca.server import MAX_TRANSPORT_BYTES, RunningCA
from mesh.identity import SpiffeId
from mesh.proto import ca_pb2, ca_pb2_grpc

Stub = ca_pb2_grpc.IstioCertificateServiceStub


def request(
    csr: str, *, impersonate: Any = None, ttl: int = 0, extra: dict[str, Any] | None = None
) -> ca_pb2.IstioCertificateRequest:
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl)
    if impersonate is not None:
        req.metadata.update({"ImpersonatedIdentity": impersonate})
    if extra:
        req.metadata.update(extra)
    return req


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def counts(ca: RunningCA, reason: str | None = None) -> tuple[float, float, float]:
    metrics = ca.service.metrics
    assert metrics is not None
    errors = ca.registry.get_sample_value("mesh_ca_request_errors_total", {"reason": reason}) if reason else 0.0
    return (
        metrics.value("citadel_server_csr_count"),
        metrics.value("citadel_server_success_cert_issuance_count"),
        errors or 0.0,
    )


def test_node_agent_gets_a_chain_that_verifies(
    stub: Stub, running_ca: RunningCA, issuer: NodeTokenIssuer, tmp_path: Path
) -> None:
    key = new_key()
    response = stub.CreateCertificate(
        request(csr_pem(key), impersonate=SLEEP, ttl=3600), metadata=bearer(issuer.mint_node_token("node-a"))
    )
    chain = list(response.cert_chain)
    assert len(chain) == 2 and chain[-1] == running_ca.root_pem  # leaf first, root last
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.public_key() == key.public_key()
    assert identity_of(leaf) == SpiffeId.parse(SLEEP)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=1) <= lifetime <= datetime.timedelta(hours=1, minutes=6)

    root = x509.load_pem_x509_certificate(chain[-1].encode())
    verifier = verification.PolicyBuilder().store(verification.Store([root])).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert verified.chain[-1] == root

    (tmp_path / "root.pem").write_text(chain[-1])
    (tmp_path / "leaf.pem").write_text(chain[0])
    out = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert counts(running_ca)[:2] == (1, 1)


def test_default_ttl_is_24h(stub: Stub, issuer: NodeTokenIssuer) -> None:
    response = stub.CreateCertificate(
        request(csr_pem(), impersonate=SLEEP), metadata=bearer(issuer.mint_node_token("node-a"))
    )
    leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == datetime.timedelta(hours=24, minutes=1)


def test_workload_gets_its_own_identity(stub: Stub, issuer: NodeTokenIssuer) -> None:
    token = issuer.mint_workload_token(SpiffeId.parse(WEB))
    response = stub.CreateCertificate(request(csr_pem(uri=WEB)), metadata=bearer(token))
    assert identity_of(x509.load_pem_x509_certificate(response.cert_chain[0].encode())) == SpiffeId.parse(WEB)


def _expired(issuer: NodeTokenIssuer) -> str:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    return issuer.mint_node_token("node-a", ttl=datetime.timedelta(days=1), now=past)


def _forged_csr() -> str:
    from cryptography.hazmat.primitives import serialization

    pem = csr_pem()
    csr = x509.load_pem_x509_csr(pem.encode())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    forged = csr.public_bytes(serialization.Encoding.DER).replace(
        csr.public_key().public_bytes(*spki), new_key().public_key().public_bytes(*spki)
    )
    return x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM).decode()


Case = tuple[str, Callable[[NodeTokenIssuer], tuple[ca_pb2.IstioCertificateRequest, list[tuple[str, str]]]], grpc.StatusCode, str, str]
NODE_A: Callable[[NodeTokenIssuer], list[tuple[str, str]]] = lambda i: bearer(i.mint_node_token("node-a"))  # noqa: E731

BAD_INPUTS: list[Case] = [
    ("garbage csr", lambda i: (request("garbage", impersonate=SLEEP), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "not a PEM-encoded PKCS#10", "bad_csr"),
    ("csr signed with a different key", lambda i: (request(_forged_csr(), impersonate=SLEEP), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "signature does not verify", "bad_csr"),
    ("csr without SAN", lambda i: (request(csr_pem(sans=[]), impersonate=SLEEP), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "no subject alternative name", "bad_san"),
    ("csr with two SANs", lambda i: (request(csr_pem(sans=[x509.UniformResourceIdentifier(SLEEP),
                                                             x509.UniformResourceIdentifier(WEB)]),
                                             impersonate=SLEEP), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "2 URI SANs", "bad_san"),
    ("csr with a DNS SAN", lambda i: (request(csr_pem(sans=[x509.DNSName("sleep.default.svc")]),
                                              impersonate=SLEEP), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "DNS name 'sleep.default.svc'", "bad_san"),
    ("csr for another identity", lambda i: (request(csr_pem(uri=WEB), impersonate=SLEEP), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, f"CSR asks for {WEB}", "bad_san"),
    ("missing token", lambda i: (request(csr_pem(), impersonate=SLEEP), []),
     grpc.StatusCode.UNAUTHENTICATED, "no credentials", "unauthenticated"),
    ("expired token", lambda i: (request(csr_pem(), impersonate=SLEEP), bearer(_expired(i))),
     grpc.StatusCode.UNAUTHENTICATED, "token has expired", "unauthenticated"),
    ("wrong-audience token", lambda i: (request(csr_pem(), impersonate=SLEEP),
                                        bearer(NodeTokenIssuer(i.key, audience="other").mint_node_token("node-a"))),
     grpc.StatusCode.UNAUTHENTICATED, "another audience", "unauthenticated"),
    ("foreign-signed token", lambda i: (request(csr_pem(), impersonate=SLEEP),
                                        bearer(NodeTokenIssuer.generate().mint_node_token("node-a"))),
     grpc.StatusCode.UNAUTHENTICATED, "not signed by this control plane", "unauthenticated"),
    ("pod on another node", lambda i: (request(csr_pem(uri=WEB), impersonate=WEB), NODE_A(i)),
     grpc.StatusCode.PERMISSION_DENIED, "scheduled on node 'node-a'", "permission_denied"),
    ("impersonating without being a node agent",
     lambda i: (request(csr_pem(), impersonate=SLEEP), bearer(i.mint_workload_token(SpiffeId.parse(WEB)))),
     grpc.StatusCode.PERMISSION_DENIED, "only node agents", "permission_denied"),
    ("node agent without impersonation", lambda i: (request(csr_pem()), NODE_A(i)),
     grpc.StatusCode.PERMISSION_DENIED, "must name the pod identity", "permission_denied"),
    ("ttl above the maximum", lambda i: (request(csr_pem(), impersonate=SLEEP, ttl=30 * 86400), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "above the CA's maximum", "ttl"),
    ("metadata of the wrong type", lambda i: (request(csr_pem(), impersonate=42), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "must be a string SPIFFE ID, not a number", "bad_request"),
    ("metadata that is not an identity", lambda i: (request(csr_pem(), impersonate="sleep"), NODE_A(i)),
     grpc.StatusCode.INVALID_ARGUMENT, "ImpersonatedIdentity: identity 'sleep'", "bad_request"),
    ("oversized request", lambda i: (request(csr_pem(), impersonate=SLEEP, extra={"pad": "x" * 100_000}), NODE_A(i)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "the CA accepts at most 65536", "oversized"),
]


@pytest.mark.parametrize(("name", "make", "code", "message", "reason"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_and_counted(
    stub: Stub,
    running_ca: RunningCA,
    issuer: NodeTokenIssuer,
    name: str,
    make: Callable[[NodeTokenIssuer], tuple[ca_pb2.IstioCertificateRequest, list[tuple[str, str]]]],
    code: grpc.StatusCode,
    message: str,
    reason: str,
) -> None:
    req, metadata = make(issuer)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateCertificate(req, metadata=metadata)
    err: Any = info.value
    assert err.code() == code, err.details()
    assert message in err.details()
    requests, issued, refused = counts(running_ca, reason)
    assert (requests, issued, refused) == (1, 0, 1)


def test_istio_error_counters(stub: Stub, running_ca: RunningCA, issuer: NodeTokenIssuer) -> None:
    for req, md in [
        (request("garbage", impersonate=SLEEP), NODE_A(issuer)),
        (request(csr_pem(), impersonate=SLEEP), []),
        (request(csr_pem(uri=WEB), impersonate=SLEEP), NODE_A(issuer)),
    ]:
        with pytest.raises(grpc.RpcError):
            stub.CreateCertificate(req, metadata=md)
    metrics = running_ca.service.metrics
    assert metrics is not None
    assert metrics.value("citadel_server_csr_parsing_err_count") == 1
    assert metrics.value("citadel_server_authentication_failure_count") == 1
    assert metrics.value("citadel_server_id_extraction_err_count") == 1
    text = generate_latest(running_ca.registry).decode()
    assert "\ncitadel_server_csr_count 3.0\n" in text
    assert "\ncitadel_server_success_cert_issuance_count 0.0\n" in text
    assert "citadel_server_root_cert_expiry_timestamp " in text


def test_request_above_the_transport_limit_is_cut_off_by_grpc(stub: Stub, issuer: NodeTokenIssuer) -> None:
    req = request(csr_pem(), impersonate=SLEEP, extra={"pad": "x" * (2 * MAX_TRANSPORT_BYTES)})
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateCertificate(req, metadata=NODE_A(issuer))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()


def test_untrusting_client_cannot_connect(running_ca: RunningCA) -> None:
    from ca.authority import generate_root, to_pem

    _, other_root = generate_root()
    creds = grpc.ssl_channel_credentials(root_certificates=to_pem(other_root).encode())
    with grpc.secure_channel(running_ca.address, creds) as channel, pytest.raises(grpc.RpcError) as info:
        Stub(channel).CreateCertificate(request(csr_pem()), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
