"""The control plane's serving certificate, and the CA's server driven from the caller's own event loop."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
from ca_helpers import SLEEP, csr_pem
from cryptography import x509
from prometheus_client import CollectorRegistry

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.pods import InMemoryPodLocator
from ca.server import CAServer
from ca.serving import RotatingServingCertificate, issue_serving_certificate
from mesh.identity import uri_sans
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
