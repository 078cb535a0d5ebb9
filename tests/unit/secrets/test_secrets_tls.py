"""A real TLS 1.3 handshake between two SVIDs issued by the CA, with the stdlib `ssl` module."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import pytest
from secrets_helpers import INTRUDER, SLEEP, WEB, issue

from ca.authority import CertificateAuthority
from ca.server import RunningCA
from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.errors import PeerIdentityError
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import DirectSSLObject, check_peer, client_context, server_context


def run_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_check: Callable[[ssl.SSLSocket], Any],
    client_check: Callable[[ssl.SSLSocket], Any],
) -> tuple[Any, Any]:
    """Handshake over loopback TCP; each side runs its check, then they exchange one message.
    Returns (server result, client result); a result is the check's value or the exception raised."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    results: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                try:
                    peer = server_check(tls)
                except PeerIdentityError as exc:
                    results["server"] = exc
                    return  # refuse: close without reading
                tls.sendall(tls.recv(100).upper())
                results["server"] = peer
        except (ssl.SSLError, OSError) as exc:
            results["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with client_ctx.wrap_socket(raw) as tls:
                    try:
                        peer = client_check(tls)
                    except PeerIdentityError as exc:
                        results["client"] = exc
                    else:
                        tls.sendall(b"ping")
                        results["client"] = (peer, tls.recv(100), tls.version(), tls.selected_alpn_protocol())
            except (ssl.SSLError, OSError) as exc:
                results["client"] = exc
    finally:
        thread.join(5)
        listener.close()
    return results.get("server"), results.get("client")


@pytest.fixture
def sleep_svid(node_a: CAClient, running_ca: RunningCA) -> Svid:
    return issue(node_a, running_ca.root_pem, SLEEP)


@pytest.fixture
def web_svid(node_b: CAClient, running_ca: RunningCA) -> Svid:
    return issue(node_b, running_ca.root_pem, WEB)


def test_mutual_tls13_with_spiffe_check(sleep_svid: Svid, web_svid: Svid) -> None:
    server, client = run_pair(
        server_context(web_svid),
        client_context(sleep_svid),
        lambda tls: check_peer(tls, trust_domain="cluster.local"),
        lambda tls: check_peer(tls, allowed={WEB}),
    )
    assert server == SLEEP
    assert client == (WEB, b"PING", "TLSv1.3", "h2")


def test_client_refuses_a_server_with_the_wrong_san(sleep_svid: Svid, node_b: CAClient, running_ca: RunningCA) -> None:
    intruder = issue(node_b, running_ca.root_pem, INTRUDER)  # valid mesh certificate, wrong identity
    server, client = run_pair(
        server_context(intruder),
        client_context(sleep_svid),
        lambda tls: check_peer(tls, trust_domain="cluster.local"),
        lambda tls: check_peer(tls, allowed={WEB}),
    )
    assert isinstance(client, PeerIdentityError)
    assert str(client) == f"peer is {INTRUDER}, expected {WEB}"
    # The server had nothing against this client; it saw the connection end without a request.
    assert server == SLEEP or isinstance(server, (ssl.SSLError, OSError)), server


def test_server_refuses_a_client_from_another_trust_domain(tmp_path: Any, web_svid: Svid) -> None:
    # A certificate from a CA of another trust domain, trusted by the server for this test: the TLS
    # layer accepts it, the SPIFFE check must not.
    other = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain="other.example")
    key = generate_key()
    ident = SpiffeId("other.example", "default", "sleep")
    pems = other.sign_workload(key.public_key(), ident, other.default_ttl).pems
    foreign = accept_issued(pems, key, ident, load_trust_bundle(other.root_pem))
    server_ctx = server_context(web_svid)
    server_ctx.load_verify_locations(cadata=other.root_pem)
    client_ctx = client_context(foreign)
    client_ctx.load_verify_locations(cadata=web_svid.trust_bundle_pem())
    server, _ = run_pair(
        server_ctx,
        client_ctx,
        lambda tls: check_peer(tls, trust_domain="cluster.local"),
        lambda tls: check_peer(tls, allowed={WEB}),
    )
    assert isinstance(server, PeerIdentityError)
    assert "outside trust domain 'cluster.local'" in str(server)


def test_peer_from_another_root_fails_the_handshake(sleep_svid: Svid, tmp_path: Any) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other")  # same trust domain, other root
    key = generate_key()
    pems = other.sign_workload(key.public_key(), WEB, other.default_ttl).pems
    impostor = accept_issued(pems, key, WEB, load_trust_bundle(other.root_pem))
    server_ctx = server_context(impostor)
    server_ctx.load_verify_locations(cadata=sleep_svid.trust_bundle_pem())
    _, client = run_pair(
        server_ctx,
        client_context(sleep_svid),
        lambda tls: check_peer(tls, trust_domain="cluster.local"),
        lambda tls: check_peer(tls, allowed={WEB}),
    )
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_tls12_is_refused(web_svid: Svid, sleep_svid: Svid) -> None:
    old = client_context(sleep_svid)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = run_pair(server_context(web_svid), old, lambda t: None, lambda t: None)
    assert isinstance(client, ssl.SSLError)


def test_check_peer_needs_a_rule() -> None:
    with pytest.raises(ValueError):
        check_peer(None, allowed=None)  # type: ignore[arg-type]


def test_memory_bio_objects_read_and_write_through_the_c_methods(sleep_svid: Svid, web_svid: Svid) -> None:
    """The contexts' `wrap_bio` objects (uvloop's TLS, our TLS sockets) call OpenSSL's methods directly:
    a handshake, a record each way read whole, into a buffer and in parts, `pending`, and a peer's
    close all behave as `ssl.SSLObject`'s."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(sleep_svid).wrap_bio(c_in, c_out)
    server = server_context(web_svid).wrap_bio(s_in, s_out, server_side=True)
    assert isinstance(client, DirectSSLObject) and isinstance(server, DirectSSLObject)
    for obj in (client, server):
        assert obj.read.__self__ is obj._sslobj and obj.write.__self__ is obj._sslobj  # type: ignore[attr-defined]

    def pump() -> None:
        s_in.write(c_out.read())
        c_in.write(s_out.read())

    for _ in range(4):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        pump()
    assert check_peer(client, allowed={WEB}) == WEB and check_peer(server, trust_domain="cluster.local") == SLEEP
    with pytest.raises(ssl.SSLWantReadError):
        server.read(100)
    assert client.write(b"hello, server") == 13
    pump()
    buf = bytearray(5)
    assert server.read(5, buf) == 5 and bytes(buf) == b"hello"
    assert server.pending() == 8
    assert server.read(100) == b", server"
    server.write(b"x" * 40_000)  # more than one record
    pump()
    got = b""
    with contextlib.suppress(ssl.SSLWantReadError):
        while len(got) < 40_000:
            got += client.read(16_384)
    assert got == b"x" * 40_000
    with contextlib.suppress(ssl.SSLWantReadError):
        server.unwrap()
    pump()
    assert client.read(100) == b""  # the peer's close_notify: the end, as `SSLObject.read` says it
