"""Item 13 (trust bundle): the CA root is rotated without restarting anything.

`meshctl ca rotate-root` (the apply API's `/ca/root/rotate`) runs three phases in the control plane:
a new root joins the trust bundle (`root-cert.pem`, what every process trusts) while the old one still
signs; after `--propagation` the new root signs every new leaf (and the control plane's own serving
certificate) with both roots still trusted; after `--overlap` the old root leaves the bundle.  Node agents
and waypoints read the bundle file again when it changes (`mesh.secrets.bundle.TrustBundle`): the secret
manager rebuilds its TLS contexts with the new roots, renews certificates that do not chain to the
bundle's first (signing) root, and the CA and discovery clients dial with the new bundle.

Here: two secret managers (two workloads) keep opening mutual TLS connections to each other, with real
certificates from the production control plane, while the root is rotated under them.
"""

from __future__ import annotations

import functools
import socket
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509

from ca.authority import generate_root, to_pem
from controlplane.app import ControlPlaneThread
from controlplane.options import Options
from mesh.api.client import ApiClient
from mesh.identity import SpiffeId
from mesh.secrets.bundle import TrustBundle
from mesh.secrets.client import CAClient
from mesh.secrets.manager import SecretManager
from mesh.secrets.renewal import RenewalPolicy
from mesh.secrets.svid import generate_key, load_trust_bundle, make_csr
from mesh.secrets.tls import check_peer

pytestmark = pytest.mark.timeout(120)

A = SpiffeId("cluster.local", "rot", "a")
B = SpiffeId("cluster.local", "rot", "b")


def roots(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def handshake_trusting(port: int, cafile: Path) -> None:
    """A plain TLS handshake with the control plane's gRPC port, trusting only `cafile`."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw):
        pass


def test_root_rotation_mid_run_keeps_mutual_tls_working(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cp = ControlPlaneThread(Options(state_dir=state, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    api = ApiClient(state / "controlplane" / "api.sock", timeout=10)
    bundle_file = state / "controlplane" / "ca" / "root-cert.pem"  # what the agents read (istio-ca-root-cert)
    old_root = roots(bundle_file)
    assert len(old_root) == 1
    target = f"127.0.0.1:{running.grpc_port}"
    tokens = {A: api.workload_token(A), B: api.workload_token(B)}
    failures: list[str] = []
    exchanges = 0

    async def main() -> None:
        nonlocal exchanges
        policy = RenewalPolicy(bundle_renew_jitter=0.2)
        with CAClient(target, TrustBundle.from_file(bundle_file).pem, tokens[A], timeout=5) as ca_a, \
                CAClient(target, TrustBundle.from_file(bundle_file).pem, tokens[B], timeout=5) as ca_b:
            a = SecretManager(ca_a, TrustBundle.from_file(bundle_file), bundle_poll=0.1, policy=policy)
            b = SecretManager(ca_b, TrustBundle.from_file(bundle_file), bundle_poll=0.1, policy=policy)
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run)
                await nursery.start(b.run)
                await a.get(A)
                await b.get(B)

                async def serve(stream: trio.SocketStream) -> None:
                    tls = trio.SSLStream(stream, b.server_context(B), server_side=True)
                    try:
                        await tls.do_handshake()
                        check_peer(tls, trust_domain="cluster.local")
                        await tls.send_all(await tls.receive_some(100))
                    except (trio.BrokenResourceError, ssl.SSLError, OSError):
                        pass
                    finally:
                        await tls.aclose()

                listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
                port = listeners[0].socket.getsockname()[1]

                async def exchange() -> None:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    tls = trio.SSLStream(stream, a.client_context(A), server_hostname=None)
                    try:
                        await tls.do_handshake()
                        assert check_peer(tls, allowed={B}) == B
                        await tls.send_all(b"ping")
                        assert await tls.receive_some(100) == b"ping"
                    finally:
                        await tls.aclose()

                await exchange()
                status = await trio.to_thread.run_sync(lambda: api.rotate_root(propagation_seconds=1.0,
                                                                                overlap_seconds=3.0))
                assert status["phase"] == "propagating"
                assert len(roots(bundle_file)) == 2
                with trio.move_on_after(7.0):
                    while True:
                        try:
                            await exchange()
                            exchanges += 1
                        except Exception as exc:  # noqa: BLE001 - every failure is what the test looks for
                            failures.append(f"{type(exc).__name__}: {exc}")
                        await trio.sleep(0.05)
                # Both certificates now chain to the new root, the only one left in the bundle.
                new_root = roots(bundle_file)
                assert len(new_root) == 1 and new_root[0] != old_root[0]
                for manager, identity in ((a, A), (b, B)):
                    svid = manager.current(identity)
                    assert svid is not None
                    x509.load_der_x509_certificate(svid.leaf.der).verify_directly_issued_by(new_root[0])
                # The CA clients made before the rotation still reach the control plane, whose serving
                # certificate now comes from the new root.
                chain = await trio.to_thread.run_sync(lambda: ca_a.create_certificate(make_csr(generate_key(), A)))
                assert x509.load_pem_x509_certificate(chain[-1].encode()) == new_root[0]
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert api.root_status()["phase"] == "idle"
        old_file = tmp_path / "old-root.pem"
        old_file.write_text("".join(to_pem(c) for c in old_root))
        handshake_trusting(running.grpc_port, bundle_file)
        with pytest.raises(ssl.SSLError):
            handshake_trusting(running.grpc_port, old_file)
    finally:
        cp.stop()
    assert failures == [], failures
    assert exchanges > 20


def test_a_secret_manager_rebuilds_its_contexts_when_the_bundle_file_changes(tmp_path: Path) -> None:
    """Without a rotation in the CA: a root added to the file is trusted by the next connection."""
    bundle_file = tmp_path / "root-cert.pem"
    _, first = generate_root()
    _, second = generate_root()
    bundle_file.write_text(to_pem(first))
    bundle = TrustBundle.from_file(bundle_file)
    assert bundle.certs() == load_trust_bundle(to_pem(first))
    bundle_file.write_text(to_pem(first) + to_pem(second))
    assert bundle.refresh() is True
    assert bundle.certs() == load_trust_bundle(to_pem(first) + to_pem(second))
    assert bundle.refresh() is False
    bundle_file.write_text("not a certificate")
    assert bundle.refresh() is False  # a bad file is reported and ignored: the last good bundle stays
    assert bundle.certs() == load_trust_bundle(to_pem(first) + to_pem(second))
