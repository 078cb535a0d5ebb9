"""A standalone CA gRPC server: what tests and benchmarks run, and `python -m ca.serve` for a manual try.

The control plane does not use this module; it hosts the CA on its own :15012 server with
`ca.service.add_to_server()` and `ca.serving.server_credentials()`.  This module shows that assembly in
one place, top to bottom: state directory, CA, token issuer, service, TLS, server.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from ca.auth import Authenticator, NodeTokenIssuer
from ca.authority import ROOT_CERT, CertificateAuthority
from ca.metrics import CAMetrics
from ca.pods import InMemoryPodLocator, PodLocator, PodPlacement
from ca.service import SERVER_OPTIONS, CertificateService, CertificateServicer, add_to_server
from ca.serving import RotatingServingCertificate, server_credentials

CA_SUBDIR = "ca"
TOKEN_KEY_FILE = "node-token-key.pem"


@dataclass
class RunningCA:
    """A CA server listening on `address`; `stop()` it when done."""

    server: grpc.Server
    address: str
    port: int
    service: CertificateService
    serving: RotatingServingCertificate
    registry: CollectorRegistry

    @property
    def root_pem(self) -> str:
        return self.service.authority.root_pem

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()


def start_ca_server(
    authority: CertificateAuthority,
    authenticator: Authenticator,
    pods: PodLocator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    max_workers: int = 16,
    serving_hosts: Sequence[str] | None = None,
) -> RunningCA:
    """Start a TLS gRPC server hosting only the CA service.  `port=0` picks a free port."""
    registry = registry if registry is not None else CollectorRegistry()
    service = CertificateService(authority, authenticator, pods, CAMetrics(registry))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS)
    add_to_server(server, CertificateServicer(service))
    creds, serving = server_credentials(authority, list(serving_hosts or [host, "localhost"]))
    bound = server.add_secure_port(f"{host}:{port}", creds)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return RunningCA(server, f"{host}:{bound}", bound, service, serving, registry)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ca.serve",
        description="Run a standalone mesh CA on TLS gRPC, printing node tokens for the nodes named.",
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="where the CA keeps its root and token key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=15012)
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--node", action="append", default=[], help="mint a node token for NODE (repeatable)")
    parser.add_argument(
        "--pod",
        action="append",
        default=[],
        metavar="NODE/NS/SA",
        help="treat a pod with service account SA in namespace NS as scheduled on NODE (repeatable)",
    )
    args = parser.parse_args(argv)


    authority = CertificateAuthority.load_or_create(args.state_dir / CA_SUBDIR, trust_domain=args.trust_domain)
    issuer = NodeTokenIssuer.load_or_create(args.state_dir / TOKEN_KEY_FILE)
    pods = InMemoryPodLocator()
    for i, spec in enumerate(args.pod):
        node, ns, sa = spec.split("/", 2)
        pods.put(PodPlacement(ns, f"pod-{i}", sa, node))
    running = start_ca_server(authority, issuer.authenticator(), pods, host=args.host, port=args.port)
    print(f"CA listening on {running.address} (root: {args.state_dir / CA_SUBDIR / ROOT_CERT})", flush=True)
    for node in args.node:
        token = issuer.mint_node_token(node, ttl=datetime.timedelta(days=1))
        print(f"node token for {node}: {token}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        running.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
