"""The control plane's serving certificate, and the CA's server driven from the caller's own event loop."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl

import grpc
from ca_helpers import SLEEP, csr_pem
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.inspect import uri_sans
from ca.pods import InMemoryPodLocator
from ca.server import CAServer
from ca.serving import RotatingServingCertificate, https_context, issue_serving_certificate
from mesh.proto import ca_pb2, ca_pb2_grpc


def test_serving_certificate_names_the_control_plane_and_its_addresses(authority: CertificateAuthority) -> None:
    cert = issue_serving_certificate(authority, ["127.0.0.1", "controlplane.mesh.local"])
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri_sans(leaf) == ["spiffe://cluster.local/ns/istio-system/sa/istiod"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["controlplane.mesh.local"]
    assert cert.root_pem.decode() == authority.root_pem
    assert b"PRIVATE KEY" in cert.key_pem


def test_serving_certificate_rotates_at_half_life(authority: CertificateAuthority) -> None:
    rotating = RotatingServingCertificate(authority, ["127.0.0.1"], ttl=datetime.timedelta(hours=2))
    first = rotating.current
    assert not rotating.refresh()
    assert rotating.refresh(now=first.renew_at() + datetime.timedelta(seconds=1))
    assert rotating.current.chain_pem != first.chain_pem


def test_ca_on_an_asyncio_grpc_server(
    authority: CertificateAuthority, issuer: NodeTokenIssuer, pods: InMemoryPodLocator
) -> None:
    registry = CollectorRegistry()

    async def main() -> tuple[list[str], grpc.StatusCode]:
        server = CAServer(authority, issuer.authenticator(), pods, registry=registry, serving_hosts=["127.0.0.1"])
        port = await server.start("127.0.0.1:0")
        try:
            channel_creds = grpc.ssl_channel_credentials(root_certificates=server.root_pem)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_creds) as channel:
                stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
                req = ca_pb2.IstioCertificateRequest(csr=csr_pem())
                req.metadata.update({"ImpersonatedIdentity": SLEEP})
                md = (("authorization", f"Bearer {issuer.mint_node_token('node-a')}"),)
                ok = await stub.CreateCertificate(req, metadata=md)
                try:
                    await stub.CreateCertificate(req, metadata=())
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
            return list(ok.cert_chain), code
        finally:
            await server.stop(None)

    chain, refused = asyncio.run(main())
    assert len(chain) == 2 and chain[-1] == authority.root_pem
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    assert registry.get_sample_value("citadel_server_csr_count") == 2


def _handshake(server_ctx: ssl.SSLContext, root_pem: str) -> bytes:
    """The leaf (DER) a client sees in a TLS handshake with `server_ctx`, done in memory."""
    client_ctx = ssl.create_default_context(cadata=root_pem)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_https_context_presents_the_current_certificate_after_it_rotates(authority: CertificateAuthority) -> None:
    ctx, rotating = https_context(authority, ["127.0.0.1"], ttl=datetime.timedelta(hours=2))
    first = x509.load_pem_x509_certificates(rotating.current.chain_pem)[0]
    assert _handshake(ctx, authority.root_pem) == first.public_bytes(serialization.Encoding.DER)
    assert rotating.refresh(now=rotating.current.renew_at() + datetime.timedelta(seconds=1))
    second = x509.load_pem_x509_certificates(rotating.current.chain_pem)[0]
    assert second != first
    # The listener keeps its first context; the next handshake is moved to the new certificate.
    assert _handshake(ctx, authority.root_pem) == second.public_bytes(serialization.Encoding.DER)
