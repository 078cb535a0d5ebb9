"""Certificate issuance latency and throughput of the mesh CA on this machine.

Runs a real CA (TLS gRPC on loopback, generated root, JWT node token, node authorization) and a node
agent-like client that asks for pod certificates through `mesh.secrets.client.CAClient`:

- sequential: one request at a time, latency p50 / p90 / p99 of `CreateCertificate` (client-side,
  including TLS channel, token check, CSR checks and signing; CSRs are made beforehand);
- concurrent: several client threads, certificates per second.

    python -m bench.ca_bench [--sequential 1000] [--concurrent 4000] [--threads 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from bench.histogram import exact_percentile
from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.pods import InMemoryPodLocator, PodPlacement
from ca.server import start_ca_server
from mesh import defaults
from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.svid import generate_key, make_csr

NODE = "bench-node"
IDENTITY = SpiffeId(defaults.TRUST_DOMAIN, "bench", "client")


def make_csrs(n: int) -> list[str]:
    return [make_csr(generate_key(), IDENTITY) for _ in range(n)]


def run(sequential: int, concurrent: int, threads: int, warmup: int = 20) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ca-bench-") as tmp:
        authority = CertificateAuthority.load_or_create(Path(tmp) / "ca")
        issuer = NodeTokenIssuer.generate()
        pods = InMemoryPodLocator([PodPlacement(IDENTITY.namespace, "client-0", IDENTITY.service_account, NODE)])
        server = start_ca_server(authority, issuer.authenticator(), pods)
        token = issuer.mint_node_token(NODE)
        try:
            client = CAClient(server.address, server.root_pem, token)
            for csr in make_csrs(warmup):
                client.create_certificate(csr, impersonate=IDENTITY)

            latencies = []
            for csr in make_csrs(sequential):
                started = time.perf_counter()
                chain = client.create_certificate(csr, impersonate=IDENTITY)
                latencies.append(time.perf_counter() - started)
                assert len(chain) == 2
            latencies.sort()

            per_thread = [make_csrs(concurrent // threads) for _ in range(threads)]
            clients = [CAClient(server.address, server.root_pem, token) for _ in range(threads)]
            for c in clients:  # connect before timing
                c.create_certificate(make_csr(generate_key(), IDENTITY), impersonate=IDENTITY)
            errors: list[BaseException] = []
            barrier = threading.Barrier(threads + 1)

            def worker(c: CAClient, csrs: list[str]) -> None:
                barrier.wait()
                try:
                    for csr in csrs:
                        c.create_certificate(csr, impersonate=IDENTITY)
                except BaseException as exc:  # report, do not hang the barrier
                    errors.append(exc)

            workers = [threading.Thread(target=worker, args=(c, csrs)) for c, csrs in zip(clients, per_thread, strict=True)]
            for w in workers:
                w.start()
            barrier.wait()
            started = time.perf_counter()
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - started
            if errors:
                raise errors[0]
            issued = sum(len(c) for c in per_thread)
            for c in [client, *clients]:
                c.close()
        finally:
            server.stop(None)

    # Signing alone (no gRPC, no TLS, no token): where the time goes.
    key = ec.generate_private_key(ec.SECP256R1())  # the CA's own key type: no conversion in the timing
    sign_times = []
    for _ in range(200):
        started = time.perf_counter()
        authority.sign_workload(key.public_key(), IDENTITY, authority.default_ttl)
        sign_times.append(time.perf_counter() - started)
    return {
        "sequential": float(sequential),
        "p50_ms": exact_percentile(latencies, 50) * 1000,
        "p90_ms": exact_percentile(latencies, 90) * 1000,
        "p99_ms": exact_percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "concurrent": float(issued),
        "threads": float(threads),
        "certs_per_s": issued / elapsed,
        "sign_only_ms": statistics.median(sign_times) * 1000,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ca_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=1000, help="requests timed one at a time")
    parser.add_argument("--concurrent", type=int, default=4000, help="requests spread over --threads")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    r = run(args.sequential, args.concurrent, args.threads)
    print(f"CA issuance, real TLS gRPC on loopback ({int(r['sequential'])} sequential requests):")
    print(f"  latency p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  mean {r['mean_ms']:.2f} ms")
    print(f"  signing alone (median, no RPC) {r['sign_only_ms']:.3f} ms")
    print(f"throughput ({int(r['concurrent'])} requests over {int(r['threads'])} client threads):")
    print(f"  {r['certs_per_s']:.0f} certificates/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
