"""`mesh.grpcwire` against real grpcio servers (a test service, the CA, the control plane's discovery),
and against raw sockets that answer what a gRPC server would not (bad bytes, HTTP errors, silence)."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.pods import InMemoryPodLocator, PodPlacement
from ca.server import RunningCA, start_ca_server
from controlplane.app import ControlPlaneThread, Running
from controlplane.discovery.source import MemorySource
from controlplane.options import Options
from mesh.grpcwire import (
    Canceller,
    Channel,
    GrpcError,
    Security,
    Stream,
    encode_timeout,
    split_target,
    unary_call,
)
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.client import CAClient
from mesh.secrets.errors import CertificateRequestError
from mesh.secrets.svid import generate_key, make_csr
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.client_state import Update
from mesh.xds.errors import Rejected
from mesh.xds.node import NodeInfo
from tests.listeners import unanswered_listener

pytestmark = pytest.mark.timeout(60)

SERVER_NAME = "ctl.mesh.test"  # the only name in the test server's certificate


# ---- certificates for the test server --------------------------------------------------------------------

@dataclass
class Pki:
    root_pem: bytes
    other_root_pem: bytes  # a root that signed nothing here
    server_key_pem: bytes
    server_chain_pem: bytes
    client_key_pem: bytes
    client_chain_pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _root(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(root: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, sans: list[x509.GeneralName],
          usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(root[1].subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(root[0], hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM) + root[1].public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = _root("grpcwire test root")
    server = _leaf(root, "server", [x509.DNSName(SERVER_NAME)], x509.ExtendedKeyUsageOID.SERVER_AUTH)
    client = _leaf(root, "client", [x509.UniformResourceIdentifier("spiffe://test/client")],
                   x509.ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(root[1].public_bytes(serialization.Encoding.PEM),
               _root("another root")[1].public_bytes(serialization.Encoding.PEM), *server, *client)


# ---- a grpcio test service (bytes in, bytes out) ----------------------------------------------------------

def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    md = dict(context.invocation_metadata())
    return request + b"|" + str(md.get("x-test", "")).encode()


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    code, _, message = request.decode().partition("|")
    context.abort(grpc.StatusCode[code], message)
    raise AssertionError("abort returns no more")


def _big(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"x" * int(request)


class Seen:
    remaining: float | None = None


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    Seen.remaining = context.time_remaining()
    time.sleep(float(request))
    return b"late"


def _peer(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b",".join(context.auth_context().get("x509_subject_alternative_name", [b"none"]))


def _where(request: bytes, context: grpc.ServicerContext) -> bytes:
    return context.peer().encode()  # the client's address and port: one per connection


def _chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for req in requests:
        if req == b"end":
            return
        if req.startswith(b"many:"):
            for i in range(int(req[5:])):
                yield b"%d" % i
        else:
            yield b"len:%d" % len(req)


HANDLERS = grpc.method_handlers_generic_handler("t.T", {
    "Echo": grpc.unary_unary_rpc_method_handler(_echo),
    "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    "Big": grpc.unary_unary_rpc_method_handler(_big),
    "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    "Peer": grpc.unary_unary_rpc_method_handler(_peer),
    "Where": grpc.unary_unary_rpc_method_handler(_where),
    "Chat": grpc.stream_stream_rpc_method_handler(_chat),
})


@dataclass
class Servers:
    plain: str
    tls: str
    mtls: str


@pytest.fixture(scope="module")
def servers(pki: Pki) -> Iterator[Servers]:
    server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[HANDLERS],
                         options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    plain = server.add_insecure_port("127.0.0.1:0")
    tls = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pki.server_key_pem, pki.server_chain_pem)]))
    mtls = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pki.server_key_pem, pki.server_chain_pem)], root_certificates=pki.root_pem, require_client_auth=True))
    server.start()
    yield Servers(f"127.0.0.1:{plain}", f"127.0.0.1:{tls}", f"127.0.0.1:{mtls}")
    server.stop(None)


# ---- unary ----------------------------------------------------------------------------------------------

def test_unary_plaintext_with_metadata(servers: Servers) -> None:
    reply = unary_call(servers.plain, "/t.T/Echo", b"hi", Security(), timeout=5, metadata=[("X-Test", "v1")])
    assert reply == b"hi|v1"


def test_bad_metadata_is_a_clear_error(servers: Servers) -> None:
    with pytest.raises(GrpcError) as err:
        unary_call(servers.plain, "/t.T/Echo", b"", Security(), timeout=5, metadata=[("x-test", "two\nlines")])
    assert err.value.code == "INTERNAL" and "cannot send metadata 'x-test'" in err.value.details
    with pytest.raises(GrpcError, match="cannot send metadata 'bad key'"):
        unary_call(servers.plain, "/t.T/Echo", b"", Security(), timeout=5, metadata=[("Bad Key", "v")])


def test_unary_empty_message(servers: Servers) -> None:
    assert unary_call(servers.plain, "/t.T/Echo", b"", Security(), timeout=5) == b"|"


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND",
                                  "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "FAILED_PRECONDITION",
                                  "UNIMPLEMENTED", "ALREADY_EXISTS", "ABORTED", "DATA_LOSS"])
def test_each_error_status_with_its_details(servers: Servers, code: str) -> None:
    details = "no: 100% ünïcode, a|b\nnext line"  # percent-encoded on the wire
    with pytest.raises(GrpcError) as err:
        unary_call(servers.plain, "/t.T/Fail", f"{code}|{details}".encode(), Security(), timeout=5)
    assert (err.value.code, err.value.details) == (code, details)


def test_an_unknown_method_is_unimplemented(servers: Servers) -> None:
    with pytest.raises(GrpcError) as err:
        unary_call(servers.plain, "/t.T/Nope", b"", Security(), timeout=5)
    assert err.value.code == "UNIMPLEMENTED"


def test_the_deadline_is_sent_and_kept(servers: Servers) -> None:
    Seen.remaining = None
    with pytest.raises(GrpcError) as err:
        unary_call(servers.plain, "/t.T/Slow", b"3", Security(), timeout=0.5)
    assert err.value.code == "DEADLINE_EXCEEDED"
    # the server was told (grpc-timeout), not only the client's clock
    assert Seen.remaining is not None and Seen.remaining <= 0.5
    assert unary_call(servers.plain, "/t.T/Slow", b"0", Security(), timeout=5) == b"late"


def test_grpc_timeout_encoding() -> None:
    assert encode_timeout(10) == "10000m"
    assert encode_timeout(0.0001) == "1m"
    assert encode_timeout(10**6) == "1000000S"


def test_a_big_response_and_the_message_limit(servers: Servers) -> None:
    size = 3 * 1024 * 1024  # well above any flow-control window
    assert unary_call(servers.plain, "/t.T/Big", b"%d" % size, Security(), timeout=10) == b"x" * size
    with pytest.raises(GrpcError) as err:
        unary_call(servers.plain, "/t.T/Big", b"%d" % size, Security(), timeout=10, max_message=1024 * 1024)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "limit of 1048576" in err.value.details


def test_a_big_request_respects_the_servers_window(servers: Servers) -> None:
    big = b"r" * (3 * 1024 * 1024)  # the server takes at most 4 MiB
    assert unary_call(servers.plain, "/t.T/Echo", big, Security(), timeout=10) == big + b"|"
    with Stream.open(servers.plain, "/t.T/Chat", Security()) as stream:
        for size in (3 * 1024 * 1024, 70_000, 0):  # the server takes at most 4 MiB
            stream.send(b"y" * size)
            assert stream.recv() == b"len:%d" % size


def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GrpcError) as err:
        unary_call(f"127.0.0.1:{port}", "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "UNAVAILABLE" and "cannot connect" in err.value.details


def test_a_bad_target_is_a_clear_error() -> None:
    with pytest.raises(GrpcError, match="not host:port"):
        split_target("no-port")
    assert split_target("[::1]:15012") == ("::1", 15012)


def test_a_channel_reuses_a_connection_that_ended_cleanly(servers: Servers, pki: Pki) -> None:
    channel = Channel(servers.tls, Security(root_pem=pki.root_pem, server_name=SERVER_NAME))
    try:
        first = channel.unary("/t.T/Where", b"", timeout=5)
        assert channel.unary("/t.T/Where", b"", timeout=5) == first
        with pytest.raises(GrpcError):  # an answer with an error status ends the call cleanly too
            channel.unary("/t.T/Fail", b"NOT_FOUND|x", timeout=5)
        assert channel.unary("/t.T/Where", b"", timeout=5) == first
        with pytest.raises(GrpcError, match="DEADLINE_EXCEEDED"):  # not after a deadline: the call was cut
            channel.unary("/t.T/Slow", b"1", timeout=0.2)
        second = channel.unary("/t.T/Where", b"", timeout=5)
        assert second != first
    finally:
        channel.close()
    fresh = Channel(servers.plain, Security(), idle_timeout=0)  # kept for no time: a connection per call
    try:
        assert fresh.unary("/t.T/Where", b"", timeout=5) != fresh.unary("/t.T/Where", b"", timeout=5)
    finally:
        fresh.close()


# ---- TLS ------------------------------------------------------------------------------------------------

def test_tls_with_server_name_override(servers: Servers, pki: Pki) -> None:
    security = Security(root_pem=pki.root_pem, server_name=SERVER_NAME)
    assert unary_call(servers.tls, "/t.T/Echo", b"s", security, timeout=5, metadata=[("x-test", "t")]) == b"s|t"


def test_tls_checks_the_targets_host_without_an_override(servers: Servers, pki: Pki) -> None:
    with pytest.raises(GrpcError) as err:
        unary_call(servers.tls, "/t.T/Echo", b"", Security(root_pem=pki.root_pem), timeout=5)
    assert err.value.code == "UNAVAILABLE" and "TLS handshake" in err.value.details
    assert "127.0.0.1" in err.value.details  # the name that did not match


def test_tls_with_the_wrong_roots_is_unavailable(servers: Servers, pki: Pki) -> None:
    with pytest.raises(GrpcError) as err:
        unary_call(servers.tls, "/t.T/Echo", b"", Security(root_pem=pki.other_root_pem, server_name=SERVER_NAME),
                   timeout=5)
    assert err.value.code == "UNAVAILABLE"
    assert "TLS handshake" in err.value.details and "certificate" in err.value.details


def test_plaintext_to_a_tls_port_is_a_clear_error(servers: Servers) -> None:
    with pytest.raises(GrpcError) as err:
        unary_call(servers.tls, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "UNAVAILABLE"


def test_mtls(servers: Servers, pki: Pki) -> None:
    security = Security(root_pem=pki.root_pem, server_name=SERVER_NAME, client_key_pem=pki.client_key_pem,
                        client_chain_pem=pki.client_chain_pem)
    assert unary_call(servers.mtls, "/t.T/Peer", b"", security, timeout=5) == b"spiffe://test/client"
    with pytest.raises(GrpcError) as err:  # no client certificate: the server refuses the handshake
        unary_call(servers.mtls, "/t.T/Peer", b"", Security(root_pem=pki.root_pem, server_name=SERVER_NAME),
                   timeout=5)
    assert err.value.code == "UNAVAILABLE"


def test_bad_client_material_is_a_clear_error(servers: Servers, pki: Pki) -> None:
    security = Security(root_pem=pki.root_pem, server_name=SERVER_NAME, client_key_pem=b"not a key",
                        client_chain_pem=pki.client_chain_pem)
    with pytest.raises(GrpcError) as err:
        unary_call(servers.mtls, "/t.T/Peer", b"", security, timeout=5)
    assert err.value.code == "UNAVAILABLE" and "bad TLS material" in err.value.details


# ---- streams --------------------------------------------------------------------------------------------

def test_a_stream_with_several_responses(servers: Servers) -> None:
    with Stream.open(servers.plain, "/t.T/Chat", Security(), keepalive_time=5) as stream:
        stream.send(b"many:300")
        assert [stream.recv() for _ in range(300)] == [b"%d" % i for i in range(300)]
        stream.send(b"end")
        assert stream.recv() is None
        assert stream.recv() is None  # the end stays the end


def test_cancel_from_another_thread_ends_a_blocked_recv(servers: Servers) -> None:
    with Stream.open(servers.plain, "/t.T/Chat", Security()) as stream:
        threading.Timer(0.2, stream.cancel).start()
        with pytest.raises(GrpcError) as err:
            stream.recv()  # nothing was asked: blocks until cancelled
        assert err.value.code == "CANCELLED"


@pytest.fixture
def unanswered() -> Iterator[str]:
    """A port that never completes a connection: its listener's accept queue is full, so SYNs are dropped."""
    with unanswered_listener() as (host, port):
        yield f"{host}:{port}"


def test_cancel_while_connecting(unanswered: str) -> None:
    canceller = Canceller()
    threading.Timer(0.3, canceller.cancel).start()
    with pytest.raises(GrpcError) as err:
        Stream.open(unanswered, "/t.T/Chat", Security(), canceller=canceller)
    assert err.value.code == "CANCELLED", err.value
    with pytest.raises(GrpcError, match="CANCELLED"):  # cancelled before it began
        Stream.open(unanswered, "/t.T/Chat", Security(), canceller=canceller)


def test_the_servers_shutdown_ends_the_stream(pki: Pki) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[HANDLERS])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Stream.open(f"127.0.0.1:{port}", "/t.T/Chat", Security()) as stream:
            stream.send(b"x")
            assert stream.recv() == b"len:1"
            server.stop(0.2)  # GOAWAY, then the stream is cut
            with pytest.raises(GrpcError) as err:
                stream.recv()
            assert err.value.code in ("UNAVAILABLE", "CANCELLED"), err.value
    finally:
        server.stop(None)


# ---- servers that misbehave (raw sockets) ---------------------------------------------------------------

class RawServer:
    """Accepts connections and hands each to `serve(sock)` on a thread."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.serve = serve
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.serve(conn)

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def raw() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    made: list[RawServer] = []

    def make(serve: Callable[[socket.socket], None]) -> RawServer:
        made.append(RawServer(serve))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _drain(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def _close_gracefully(conn: socket.socket) -> None:
    """Close as a real server does: FIN after what was sent, then read what the client still sends.  A
    close() with unread bytes makes the kernel answer with a reset, which may discard the answer just
    written and fail the call for a reason of the test's own making."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(5)
        _drain(conn)
    conn.close()


def _h2_server(on_request: Callable[[h2.connection.H2Connection, int, int], bool]) -> Callable[[socket.socket], None]:
    """A real HTTP/2 server (h2): `on_request(h2c, stream_id, n)` answers the n-th request (from 1) and
    returns True to close the connection after what it queued."""

    def serve(conn: socket.socket) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        calls = 0
        while chunk := conn.recv(65536):
            for event in h2c.receive_data(chunk):
                if isinstance(event, h2.events.RequestReceived):
                    calls += 1
                    if on_request(h2c, event.stream_id, calls):
                        conn.sendall(h2c.data_to_send())
                        _close_gracefully(conn)
                        return
            conn.sendall(h2c.data_to_send())

    return serve


def _h2_answer(headers: list[tuple[str, str]], data: bytes = b"", trailers: list[tuple[str, str]] | None = None
               ) -> Callable[[socket.socket], None]:
    """A real HTTP/2 server (h2) that answers every request with `headers`, `data`, `trailers`."""

    def answer(h2c: h2.connection.H2Connection, sid: int, _n: int) -> bool:
        h2c.send_headers(sid, headers, end_stream=not data and trailers is None)
        if data:
            h2c.send_data(sid, data, end_stream=trailers is None)
        if trailers is not None:
            h2c.send_headers(sid, trailers, end_stream=True)
        return False

    return _h2_server(answer)


def _answer_hi(h2c: h2.connection.H2Connection, sid: int) -> None:
    """A gRPC OK answer with the one message b"hi"."""
    h2c.send_headers(sid, GRPC_OK)
    h2c.send_data(sid, b"\x00\x00\x00\x00\x02hi")
    h2c.send_headers(sid, [("grpc-status", "0")], end_stream=True)


GRPC_OK = [(":status", "200"), ("content-type", "application/grpc")]


@pytest.mark.parametrize(("status", "code"), [("400", "INTERNAL"), ("401", "UNAUTHENTICATED"),
                                              ("403", "PERMISSION_DENIED"), ("404", "UNIMPLEMENTED"),
                                              ("429", "UNAVAILABLE"), ("502", "UNAVAILABLE"),
                                              ("503", "UNAVAILABLE"), ("504", "UNAVAILABLE"), ("500", "UNKNOWN")])
def test_http_statuses_map_to_grpc_codes(raw: Any, status: str, code: str) -> None:
    server = raw(_h2_answer([(":status", status), ("content-type", "text/plain")], b"oops"))
    with pytest.raises(GrpcError) as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == code and f"HTTP {status}" in err.value.details


def test_a_trailers_only_answer(raw: Any) -> None:
    server = raw(_h2_answer(GRPC_OK + [("grpc-status", "7"), ("grpc-message", "go%20away")]))
    with pytest.raises(GrpcError) as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert (err.value.code, err.value.details) == ("PERMISSION_DENIED", "go away")


def test_a_compressed_message_is_refused(raw: Any) -> None:
    framed = b"\x01\x00\x00\x00\x03abc"
    server = raw(_h2_answer(GRPC_OK, framed, [("grpc-status", "0")]))
    with pytest.raises(GrpcError) as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "INTERNAL" and "compressed" in err.value.details
    server = raw(_h2_answer(GRPC_OK + [("grpc-encoding", "gzip")], framed, [("grpc-status", "0")]))
    with pytest.raises(GrpcError) as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "INTERNAL" and "gzip" in err.value.details


def test_missing_status_and_cut_messages_are_errors(raw: Any) -> None:
    server = raw(_h2_answer(GRPC_OK, b"\x00\x00\x00\x00\x01a", [("x-other", "1")]))
    with pytest.raises(GrpcError, match="without grpc-status") as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "UNKNOWN"
    server = raw(_h2_answer(GRPC_OK, b"\x00\x00\x00\x00\x09abc", [("grpc-status", "0")]))
    with pytest.raises(GrpcError, match="inside a message") as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "INTERNAL"


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "answered HTTP/1"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage garbage", "does not speak HTTP/2"),
    # a SETTINGS frame, then a frame on stream 0 that HTTP/2 forbids there (DATA)
    (b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", "broke HTTP/2"),
])
def test_bad_bytes_from_the_server_are_a_clear_error(raw: Any, answer: bytes, expected: str) -> None:
    def serve(conn: socket.socket) -> None:
        conn.sendall(answer)
        _drain(conn)  # and keep the connection open: the client must not wait for more

    server = raw(serve)
    with pytest.raises(GrpcError) as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=30)
    assert err.value.code == "UNAVAILABLE" and expected in err.value.details, err.value
    with pytest.raises(GrpcError) as err, Stream.open(server.target, "/t.T/Chat", Security()) as stream:
        stream.recv()
    assert err.value.code == "UNAVAILABLE" and expected in err.value.details, err.value


def test_a_connection_the_server_closed_while_idle_is_not_reused(raw: Any) -> None:

    def one_call(h2c: h2.connection.H2Connection, sid: int, _n: int) -> bool:  # then GOAWAY and close
        _answer_hi(h2c, sid)
        h2c.close_connection()
        return True

    server = raw(_h2_server(one_call))
    channel = Channel(server.target, Security())
    try:
        for _ in range(3):
            assert channel.unary("/t.T/Echo", b"", timeout=5) == b"hi"
    finally:
        channel.close()
    assert len(server.conns) == 3


def test_a_reused_connection_closed_as_the_call_begins_is_retried_once(raw: Any) -> None:
    def first_only(h2c: h2.connection.H2Connection, sid: int, n: int) -> bool:  # closes at the second call
        if n == 2:
            return True
        _answer_hi(h2c, sid)
        return False

    server = raw(_h2_server(first_only))
    channel = Channel(server.target, Security())
    try:
        assert channel.unary("/t.T/Echo", b"", timeout=5) == b"hi"
        assert channel.unary("/t.T/Echo", b"", timeout=5) == b"hi"  # on a second connection
    finally:
        channel.close()
    assert len(server.conns) == 2


def test_a_server_that_closes_at_once(raw: Any) -> None:
    server = raw(lambda conn: conn.close())
    with pytest.raises(GrpcError) as err:
        unary_call(server.target, "/t.T/Echo", b"", Security(), timeout=5)
    assert err.value.code == "UNAVAILABLE" and server.target in err.value.details  # closed or reset


def test_a_silent_server_fails_the_keepalive(raw: Any) -> None:
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

    def serve(conn: socket.socket) -> None:  # speaks HTTP/2's first word, then never answers again
        conn.sendall(settings)
        _drain(conn)

    server = raw(serve)
    with Stream.open(server.target, "/t.T/Chat", Security(), keepalive_time=0.2, keepalive_timeout=0.2) as stream:
        stream.send(b"hello")
        with pytest.raises(GrpcError) as err:
            stream.recv()
    assert err.value.code == "UNAVAILABLE" and "keepalive ping" in err.value.details


def test_a_silent_server_before_http2_is_unavailable(raw: Any) -> None:
    server = raw(_drain)
    with pytest.raises(GrpcError) as err:
        Stream.open(server.target, "/t.T/Chat", Security(), connect_timeout=0.3)
    assert err.value.code == "UNAVAILABLE" and "SETTINGS" in err.value.details


# ---- the CA and discovery clients on it, against the real servers -----------------------------------------

@pytest.fixture
def ca(tmp_path: Path) -> Iterator[tuple[RunningCA, NodeTokenIssuer]]:
    issuer = NodeTokenIssuer.generate()
    authority = CertificateAuthority.load_or_create(tmp_path / "ca")
    pods = InMemoryPodLocator([PodPlacement("default", "sleep-1", "sleep", "node-a")])
    server = start_ca_server(authority, issuer.authenticator(), pods)
    yield server, issuer
    server.stop(None)


SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")


def test_ca_client_issues_and_refuses(ca: tuple[RunningCA, NodeTokenIssuer]) -> None:
    server, issuer = ca
    csr = make_csr(generate_key(), SLEEP)
    with CAClient(server.address, server.root_pem, issuer.mint_node_token("node-a"), timeout=5) as client:
        chain = client.create_certificate(csr, impersonate=SLEEP)
        assert len(chain) >= 2 and chain[0].startswith("-----BEGIN CERTIFICATE-----")
    with CAClient(server.address, server.root_pem, issuer.mint_node_token("node-b"), timeout=5) as client:
        with pytest.raises(CertificateRequestError) as err:  # node-b has no such pod
            client.create_certificate(csr, impersonate=SLEEP)
        assert err.value.code == "PERMISSION_DENIED" and not err.value.retryable
    with CAClient(server.address, server.root_pem, "not-a-token", timeout=5) as client:
        with pytest.raises(CertificateRequestError) as err:
            client.create_certificate(csr, impersonate=SLEEP)
        assert err.value.code == "UNAUTHENTICATED" and err.value.retryable


def test_ca_client_with_the_wrong_roots_and_rotated_roots(ca: tuple[RunningCA, NodeTokenIssuer], pki: Pki) -> None:
    server, issuer = ca
    roots = [pki.other_root_pem]
    with CAClient(server.address, lambda: roots[0], issuer.mint_node_token("node-a"), timeout=5) as client:
        with pytest.raises(CertificateRequestError) as err:
            client.create_certificate(make_csr(generate_key(), SLEEP), impersonate=SLEEP)
        assert err.value.code == "UNAVAILABLE" and err.value.retryable
        assert "TLS handshake" in str(err.value) and "certificate" in str(err.value)
        roots[0] = server.root_pem.encode()  # the roots are read again for each call
        assert client.create_certificate(make_csr(generate_key(), SLEEP), impersonate=SLEEP)


def test_ca_client_server_name(ca: tuple[RunningCA, NodeTokenIssuer]) -> None:
    server, issuer = ca
    port = server.address.rpartition(":")[2]
    token = issuer.mint_node_token("node-a")
    # "localhost" is in the CA's serving certificate; the dialled address is not checked then
    with CAClient(f"127.0.0.1:{port}", server.root_pem, token, server_name="localhost", timeout=5) as client:
        assert client.create_certificate(make_csr(generate_key(), SLEEP), impersonate=SLEEP)
    with CAClient(f"127.0.0.1:{port}", server.root_pem, token, server_name="elsewhere.test", timeout=5) as client:
        with pytest.raises(CertificateRequestError) as err:
            client.create_certificate(make_csr(generate_key(), SLEEP), impersonate=SLEEP)
        assert err.value.code == "UNAVAILABLE" and "elsewhere.test" in str(err.value)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[Running, MemorySource]]:
    source = MemorySource([pb.Workload(uid="default/a", name="a", namespace="default", addresses=["10.0.0.1"])])
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
                            source)
    running = cp.start()
    yield running, source
    cp.stop()


def _xds(running: Running, handler: Callable[[Update], None] | None = None, **kw: Any) -> XdsClient:
    token = running.extras["token_issuer"].mint_node_token("n1")
    cfg = ClientConfig(target=f"127.0.0.1:{running.grpc_port}", node=NodeInfo(id="", role="nodeagent", node="n1"),
                       subscriptions={rs.WORKLOAD: None}, root_pem=running.root_pem,
                       metadata=(("authorization", f"Bearer {token}"),), backoff_initial=0.05, backoff_max=0.3, **kw)
    return XdsClient(cfg, handler)


def test_discovery_stream_nack_then_ack(plane: tuple[Running, MemorySource]) -> None:
    running, source = plane

    def refuse_bad(update: Update) -> None:
        for msg in update.updated.values():
            if "bad" in msg.name:  # type: ignore[attr-defined]
                raise Rejected("a bad workload")

    with _xds(running, refuse_bad) as client:
        assert client.wait_synced(10)
        for i in range(5):  # several responses on one stream
            source.put(pb.Workload(uid=f"default/w{i}", name=f"w{i}", namespace="default", addresses=[f"10.0.1.{i}"]))
        assert client.wait_for(lambda c: len(c.resources(rs.WORKLOAD)) == 6, 10)
        source.put(pb.Workload(uid="default/bad", name="bad", namespace="default"))
        assert client.wait_for(lambda c: c.nacks >= 1, 10)
        assert "default/bad" not in client.resources(rs.WORKLOAD)
        source.remove(rs.WORKLOAD, "default/bad")
        source.put(pb.Workload(uid="default/ok", name="ok", namespace="default"))
        # (two source changes, two pushes: the version read may be the first's until the second is made)
        assert client.wait_for(lambda c: "default/ok" in c.resources(rs.WORKLOAD)
                               and c.acked_version(rs.WORKLOAD) == running.discovery.version, 10)
        assert "default/ok" in client.resources(rs.WORKLOAD) and client.connects == 1


def test_discovery_stop_while_connecting(unanswered: str) -> None:
    client = XdsClient(ClientConfig(target=unanswered, node=NodeInfo(id="", role="nodeagent", node="n1")))
    client.start()
    deadline = time.monotonic() + 10
    while client._canceller is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # in the connect (10 s to give up), longer than stop() waits (5 s)
    client.stop()
    assert client._thread is not None and not client._thread.is_alive()
    assert "CANCELLED" in client.last_error


def test_discovery_stop_while_blocked_and_wrong_roots(plane: tuple[Running, MemorySource], pki: Pki) -> None:
    running, _ = plane
    client = _xds(running)
    client.start()
    assert client.wait_synced(10)
    assert client._thread is not None
    client.stop()  # the thread is blocked reading the stream: cancelling it ends the read
    assert not client._thread.is_alive() and not client.connected
    token = running.extras["token_issuer"].mint_node_token("n1")
    cfg = ClientConfig(target=f"127.0.0.1:{running.grpc_port}", node=NodeInfo(id="", role="nodeagent", node="n1"),
                       root_pem=pki.other_root_pem, metadata=(("authorization", f"Bearer {token}"),),
                       backoff_initial=0.05, backoff_max=0.1)
    with XdsClient(cfg) as wrong:
        assert wrong.wait_for(lambda c: "certificate" in c.last_error, 10), wrong.last_error
        assert wrong.last_error.startswith("UNAVAILABLE") and not wrong.connected
