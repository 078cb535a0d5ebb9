"""A small synchronous gRPC client over HTTP/2 (`h2` and the stdlib's `ssl`), for the data plane.

The node agent and the waypoint call two gRPC methods of the control plane: the CA's unary
`CreateCertificate` and discovery's bidirectional `DeltaAggregatedResources`.  grpcio was ~15 MiB of an
idle agent (its C core, BoringSSL and six threads) for those two calls, so they go over this instead;
the servers keep grpcio.  Messages are bytes here (the callers serialize their protobufs).

    reply = unary_call(target, "/pkg.Service/Method", request_bytes, Security(root_pem=...), timeout=10)

    stream = Stream.open(target, "/pkg.Service/Stream", Security(root_pem=...), keepalive_time=20)
    stream.send(request_bytes)
    message = stream.recv()          # None once the server ended the stream with OK
    stream.cancel()                  # from any thread: a blocked `recv` ends with CANCELLED

One connection per call or stream (the CA is asked rarely; discovery holds one stream).  Every failure
is a `GrpcError` carrying the status code's name ("UNAVAILABLE", "PERMISSION_DENIED", ...) and the
details: status from the trailers (or a trailers-only answer), non-200 HTTP statuses mapped as the gRPC
spec says, connection and TLS failures as UNAVAILABLE, the deadline as DEADLINE_EXCEEDED.  TLS is 1.2+
with ALPN "h2"; no `Security.root_pem` means plaintext HTTP/2 with prior knowledge (tests, debugging).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import re
import select
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mesh.errors import MeshError
from mesh.secrets.tls import in_memory_files

Metadata = Sequence[tuple[str, str]]

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit
CONNECT_TIMEOUT = 10.0  # seconds to connect, finish TLS and read the server's SETTINGS
_READ_SIZE = 65536
_WINDOW = 1024 * 1024  # what the client lets the server send ahead, per stream and connection
_USER_AGENT = "mesh-grpcwire/1"

# HTTP status -> gRPC status when the answer has no grpc-status (gRPC's "HTTP to gRPC Status Code Mapping").
_HTTP_TO_GRPC = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                 429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}
# RST_STREAM error code -> gRPC status (gRPC's PROTOCOL-HTTP2 "Errors").
_RESET_TO_GRPC: dict[int, str] = {h2.errors.ErrorCodes.REFUSED_STREAM: "UNAVAILABLE", h2.errors.ErrorCodes.CANCEL: "CANCELLED",
                  h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: "RESOURCE_EXHAUSTED",
                  h2.errors.ErrorCodes.INADEQUATE_SECURITY: "PERMISSION_DENIED"}
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class GrpcError(MeshError):
    """A call that did not end with OK: `code` is the status name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Security:
    """How to reach the server: TLS trusting `root_pem` (PEM bytes), or plaintext when it is None."""

    root_pem: bytes | None = None
    server_name: str | None = None  # the name checked in the server's certificate, else the target's host
    client_key_pem: bytes | None = None  # mTLS: the client's key and chain, both or neither
    client_chain_pem: bytes | None = None

    @functools.cached_property
    def context(self) -> ssl.SSLContext:
        """The TLS context (built once per `Security`)."""
        assert self.root_pem is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        ctx.load_verify_locations(cadata=self.root_pem.decode("ascii", "replace"))
        if self.client_key_pem and self.client_chain_pem:
            # `ssl` reads a key and chain only from files: anonymous memory files, as for the SVIDs.
            with in_memory_files(self.client_chain_pem, self.client_key_pem) as (chain_path, key_path):
                ctx.load_cert_chain(chain_path, key_path)
        return ctx


def split_target(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); a clear error otherwise."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GrpcError("UNAVAILABLE", f"target {target!r} is not host:port")
    return host.strip("[]"), int(port)


def encode_timeout(seconds: float) -> str:
    """The `grpc-timeout` header: at most 8 digits and a unit."""
    millis = max(1, int(seconds * 1000))
    return f"{millis}m" if millis < 10**8 else f"{max(1, int(seconds))}S"


_KEY = re.compile(r"^[0-9a-z_.-]+$")
_VALUE = re.compile(r"^[\x20-\x7e]*$")


def _headers_of(metadata: Metadata) -> list[tuple[str, str]]:
    """Metadata as HTTP/2 headers: lowercase names, printable ASCII values (gRPC's ASCII metadata)."""
    out = []
    for key, value in metadata:
        key = key.lower()
        if not _KEY.match(key) or key.startswith(("grpc-", ":")) or not _VALUE.match(value):
            raise GrpcError("INTERNAL", f"cannot send metadata {key!r}: names are [0-9a-z_.-], not grpc-*, "
                            "and values printable ASCII")
        out.append((key, value))
    return out


def _frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


class Canceller:
    """Cancels a call from any thread, also while it is still connecting: the socket is shut down, which
    ends a blocked connect, TLS handshake or read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.cancelled = False

    def bind(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.cancelled:
                self._shutdown(sock)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._sock is not None:
                self._shutdown(self._sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Transport:
    """A connected socket, TLS done in memory (`ssl.MemoryBIO`) so that one thread may read while
    another writes: every use of the TLS object is under `lock`, which the caller holds."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None) -> None:
        self.sock = sock
        self.tls = tls
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()

    @classmethod
    def connect(cls, target: str, security: Security, deadline: float, canceller: Canceller) -> _Transport:
        host, port = split_target(target)
        what = f"{target}"
        try:
            sock = cls._dial(host, port, deadline, canceller)
        except OSError as exc:
            if canceller.cancelled:
                raise GrpcError("CANCELLED", f"cancelled while connecting to {what}") from None
            raise GrpcError("UNAVAILABLE", f"cannot connect to {what}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        if security.root_pem is None:
            return cls(sock, None)
        try:
            ctx = security.context
        except (ssl.SSLError, ValueError) as exc:
            sock.close()
            raise GrpcError("UNAVAILABLE", f"bad TLS material for {what}: {exc}") from None
        self = cls(sock, None)
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=security.server_name or host)
        try:
            self._handshake(deadline)
        except ssl.SSLError as exc:
            sock.close()
            reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            raise GrpcError("UNAVAILABLE", f"TLS handshake with {what} failed: {reason}") from None
        except (OSError, GrpcError) as exc:
            sock.close()
            if canceller.cancelled:
                raise GrpcError("CANCELLED", f"cancelled while connecting to {what}") from None
            detail = exc.details if isinstance(exc, GrpcError) else str(exc)
            raise GrpcError("UNAVAILABLE", f"TLS handshake with {what} failed: {detail}") from None
        if self.tls.selected_alpn_protocol() != "h2":
            sock.close()
            raise GrpcError("UNAVAILABLE", f"{what} did not agree to HTTP/2 (ALPN h2) in TLS")
        return self

    @staticmethod
    def _dial(host: str, port: int, deadline: float, canceller: Canceller) -> socket.socket:
        """A connected TCP socket, shown to `canceller` before it connects."""
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            canceller.bind(sock)
            try:
                if canceller.cancelled:
                    raise OSError("cancelled")
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
                if canceller.cancelled:
                    break
        raise error

    def _handshake(self, deadline: float) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_tls()
                data = self.recv_raw(deadline)
                if not data:
                    raise GrpcError("UNAVAILABLE", "the server closed the connection") from None
                self.incoming.write(data)
        self._flush_tls()

    def _flush_tls(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def recv_raw(self, deadline: float | None) -> bytes:
        """Bytes from the socket (b"" at EOF); `TimeoutError` when `deadline` passes first."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise TimeoutError
        return self.sock.recv(_READ_SIZE)

    def decrypt(self, data: bytes) -> tuple[bytes, bool]:
        """The plaintext of `data` just read, and whether the peer closed TLS (hold `lock`)."""
        if self.tls is None:
            return data, not data
        if not data:
            return b"", True
        self.incoming.write(data)
        out = bytearray()
        closed = False
        while True:
            try:
                chunk = self.tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
        self._flush_tls()  # e.g. an answer to a key update
        return bytes(out), closed

    def send(self, data: bytes) -> None:
        """Write `data` (hold `lock`)."""
        if not data:
            return
        if self.tls is None:
            self.sock.sendall(data)
        else:
            self.tls.write(data)
            self._flush_tls()

    def close(self) -> None:
        self.sock.close()


class _Call:
    """One HTTP/2 connection and the gRPC call on it (`start` begins the next one on the same connection,
    when the last ended cleanly).  `pump` reads and handles what the server sent (from one thread at a
    time); `send` writes messages from another thread, within the server's window."""

    def __init__(self, target: str, security: Security, *, max_message: int = DEFAULT_MAX_MESSAGE,
                 connect_timeout: float = CONNECT_TIMEOUT, end_on_goaway: bool = False,
                 canceller: Canceller | None = None) -> None:
        self.target = target
        self.canceller = canceller or Canceller()
        self.security = security
        self.end_on_goaway = end_on_goaway
        self.inline = True  # the caller's thread reads too (unary); a stream has a reader thread
        self.max_message = max_message
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # the send window grew, or the call ended
        # the call's state (`start` resets it)
        self.stream_id = 0
        self.deadline: float | None = None
        self.messages: queue.Queue[bytes | GrpcError | None] = queue.Queue()
        self.buffer = bytearray()
        self.status: GrpcError | None = None  # set once: the call's outcome (code "OK" for success)
        self.http_status = 0
        self.reusable = False  # the call ended with the server's trailers: the connection can carry another
        # the connection's state
        self.gone = False  # GOAWAY, EOF or a broken connection: no more calls on it
        self.last_read = time.monotonic()
        self.ping_sent: float | None = None
        self.saw_settings = False
        self.connect_deadline = time.monotonic() + connect_timeout
        self.transport = _Transport.connect(target, security, self.connect_deadline, self.canceller)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                                   h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.increment_flow_control_window(_WINDOW - 65535)

    def start(self, method: str, *, metadata: Metadata = (), timeout: float | None = None) -> None:
        """Begin a call: send its headers (the connection's preface with the first one)."""
        extra = _headers_of(metadata)
        try:
            with self.lock:
                self.deadline = None if timeout is None else time.monotonic() + timeout
                self.messages = queue.Queue()
                self.buffer = bytearray()
                self.status = None
                self.http_status = 0
                self.reusable = False
                self.stream_id = self.conn.get_next_available_stream_id()
                scheme = "http" if self.security.root_pem is None else "https"
                headers = [(":method", "POST"), (":scheme", scheme), (":path", method),
                           (":authority", self.security.server_name or self.target), ("te", "trailers"),
                           ("content-type", "application/grpc"), ("user-agent", _USER_AGENT)]
                if timeout is not None:
                    headers.append(("grpc-timeout", encode_timeout(timeout)))
                headers += extra
                self.conn.send_headers(self.stream_id, headers)
                self.transport.send(self.conn.data_to_send())
            while not self.saw_settings:  # the server must speak HTTP/2 before anything else
                wait = self.connect_deadline if self.deadline is None else min(self.connect_deadline, self.deadline)
                if self.pump(wait, waiting_for="the server's HTTP/2 SETTINGS"):
                    break
            if self.status is not None and self.status.code != "OK":
                raise self.status
        except OSError as exc:
            self.gone = True
            raise GrpcError("UNAVAILABLE", f"connection to {self.target} failed: {exc}") from None
        except h2.exceptions.ProtocolError as exc:
            self.gone = True
            raise GrpcError("INTERNAL", f"cannot send the request to {self.target}: {exc}") from None

    def idle_check(self) -> bool:
        """Handle what came while the connection was idle (pings, GOAWAY, EOF); True if it can carry a call."""
        try:
            while not self.gone and select.select([self.transport.sock], [], [], 0)[0]:
                self._absorb(self.transport.sock.recv(_READ_SIZE))
        except OSError:
            self.gone = True
        return self.reusable and not self.gone and not self.cancelled

    # -- writing ----------------------------------------------------------------------------------

    def send(self, message: bytes, *, end: bool = False) -> None:
        data = memoryview(_frame(message))
        with self.lock:
            while True:
                if self.status is not None:
                    return  # the call is over; its outcome comes from recv
                try:
                    window = self.conn.local_flow_control_window(self.stream_id)
                    size = min(window, self.conn.max_outbound_frame_size, len(data))
                    if size > 0 or not data:
                        last = size == len(data)
                        self.conn.send_data(self.stream_id, bytes(data[:size]), end_stream=end and last)
                        self._flush()
                        data = data[size:]
                        if last:
                            return
                        continue
                except h2.exceptions.ProtocolError:
                    return  # the stream is closed: its outcome comes from recv
                if self.inline:  # nobody else reads: read until the server's window grows
                    self.lock.release()
                    try:
                        self.pump(self.deadline)
                    finally:
                        self.lock.acquire()
                    continue
                expired = not self.changed.wait(self._remaining(self.deadline))
                if expired and self.deadline is not None and time.monotonic() >= self.deadline:
                    return  # the reader reports the deadline

    def _flush(self) -> None:
        try:
            self.transport.send(self.conn.data_to_send())
        except OSError as exc:
            self.gone = True
            self._end(GrpcError("UNAVAILABLE", f"connection to {self.target} failed: {exc}"))

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    # -- reading ----------------------------------------------------------------------------------

    def pump(self, deadline: float | None, *, waiting_for: str = "an answer",
             keepalive: tuple[float, float] | None = None) -> bool:
        """Read once and handle it; True when the call is over.  `keepalive` is (time, timeout): ping
        when nothing was read for `time`, give up when the ping is not answered within `timeout`."""
        if self.status is not None:
            return True
        wake = deadline
        if keepalive is not None:
            due = self.ping_sent + keepalive[1] if self.ping_sent is not None else self.last_read + keepalive[0]
            wake = due if wake is None else min(wake, due)
        try:
            data = self.transport.recv_raw(wake)
        except TimeoutError:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if self.deadline is not None and deadline >= self.deadline:
                    self._fail("DEADLINE_EXCEEDED", f"no answer from {self.target} within the deadline")
                else:
                    self._fail("UNAVAILABLE", f"no answer from {self.target} while waiting for {waiting_for}")
            elif keepalive is not None and self.ping_sent is not None and now >= self.ping_sent + keepalive[1]:
                self._fail("UNAVAILABLE", f"keepalive ping to {self.target} not answered within {keepalive[1]:g}s")
            elif keepalive is not None and self.ping_sent is None and now >= self.last_read + keepalive[0]:
                with self.lock:
                    self.ping_sent = now
                    self.conn.ping(struct.pack(">Q", int(now * 1000) & (2**64 - 1)))
                    self._flush()
            return self.status is not None
        except OSError as exc:
            data = b""
            self.gone = True
            if not self.cancelled:
                self._fail("UNAVAILABLE", f"connection to {self.target} failed: {exc}")
        self._absorb(data)
        return self.status is not None

    def _absorb(self, data: bytes) -> None:
        """Handle `data` just read (b"": the peer closed)."""
        with self.lock:
            if self.cancelled:
                self.gone = True
                self._end(GrpcError("CANCELLED", "cancelled by the client"))
                return
            self.last_read = time.monotonic()
            try:
                plain, closed = self.transport.decrypt(data)
            except ssl.SSLError as exc:
                self.gone = True
                self._end(GrpcError("UNAVAILABLE", f"TLS from {self.target} failed: {exc.reason or exc}"))
                return
            if plain:
                if not self.saw_settings:
                    self._check_preface(plain)
                if not self.gone:
                    self._receive(plain)
            if closed:
                self.gone = True
                self._end(GrpcError("UNAVAILABLE", f"{self.target} closed the connection"))

    def _check_preface(self, plain: bytes) -> None:
        # An HTTP/2 server's first frame is SETTINGS on stream 0: type 4 at byte 3.
        if len(plain) >= 4 and plain[3] == 4:
            return
        shown = plain[:32]
        if plain.startswith(b"HTTP/"):
            self.gone = True
            self._end(GrpcError("UNAVAILABLE", f"{self.target} answered HTTP/1 ({shown!r}), not HTTP/2"))
        elif len(plain) >= 4:
            self.gone = True
            self._end(GrpcError("UNAVAILABLE", f"{self.target} does not speak HTTP/2: it began with {shown!r}"))

    def _receive(self, plain: bytes) -> None:
        try:
            events = self.conn.receive_data(plain)
        except Exception as exc:  # h2's ProtocolError and the frame parser's errors
            self.gone = True
            self._end(GrpcError("UNAVAILABLE", f"{self.target} broke HTTP/2: {type(exc).__name__}: {exc}"))
            self._flush()
            return
        for event in events:
            self._on_event(event)
            if self.status is not None and self.status.code != "OK":
                break
        self._flush()
        self.changed.notify_all()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.saw_settings = True
        elif isinstance(event, h2.events.PingAckReceived):
            self.ping_sent = None
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.gone = True
            if event.last_stream_id is not None and event.last_stream_id < self.stream_id:
                self._end(GrpcError("UNAVAILABLE", f"{self.target} went away before the call started "
                                    f"({_error_name(event.error_code)})"))
            elif self.end_on_goaway or event.error_code != h2.errors.ErrorCodes.NO_ERROR:
                # A stream ends cleanly at the server's GOAWAY (the server is leaving: dial again).
                self._end(GrpcError("UNAVAILABLE", f"{self.target} closed the connection (GOAWAY "
                                    f"{_error_name(event.error_code)})"))
            # else: a graceful GOAWAY lets the call already started finish
        elif getattr(event, "stream_id", self.stream_id) != self.stream_id:
            return
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_headers(_strings(event.headers), event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, self.stream_id)
            self.buffer += event.data
            self._split()
        elif isinstance(event, h2.events.TrailersReceived):
            self._on_trailers(_strings(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            if self.status is None:
                self._end(GrpcError("INTERNAL", f"{self.target} ended the stream without trailers"))
        elif isinstance(event, h2.events.StreamReset):
            code = _RESET_TO_GRPC.get(int(event.error_code or 0), "INTERNAL")
            self._end(GrpcError(code, f"{self.target} reset the stream ({_error_name(event.error_code)})"))

    def _on_headers(self, headers: list[tuple[str, str]], trailers_only: bool) -> None:
        h = dict(headers)
        self.http_status = int(h.get(":status", "0") or 0)
        if trailers_only and "grpc-status" in h:
            self._on_trailers(headers)
            return
        if self.http_status != 200:
            name = _HTTP_TO_GRPC.get(self.http_status, "UNKNOWN")
            self._end(GrpcError(name, f"{self.target} answered HTTP {self.http_status}"))
            return
        if not h.get("content-type", "").startswith("application/grpc"):
            self._end(GrpcError("UNKNOWN", f"{self.target} answered content-type {h.get('content-type')!r}, "
                                "not application/grpc"))
            return
        encoding = h.get("grpc-encoding", "identity")
        if encoding != "identity":
            self._end(GrpcError("INTERNAL", f"{self.target} compresses with {encoding!r}, which this client "
                                "does not accept"))
            return
        if trailers_only:
            self._end(GrpcError("UNKNOWN", f"{self.target} ended the answer without grpc-status"))

    def _on_trailers(self, headers: list[tuple[str, str]]) -> None:
        h = dict(headers)
        raw = h.get("grpc-status")
        details = urllib.parse.unquote(h.get("grpc-message", ""), errors="replace")
        if self.status is None:
            self.reusable = True  # the server's last word on this call
        if raw is None:
            self._end(GrpcError("UNKNOWN", f"{self.target} sent trailers without grpc-status"))
        elif not raw.isdigit() or int(raw) >= len(STATUS_NAMES):
            self._end(GrpcError("UNKNOWN", f"{self.target} sent grpc-status {raw!r}: {details}"))
        else:
            self._end(GrpcError(STATUS_NAMES[int(raw)], details))

    def _split(self) -> None:
        while len(self.buffer) >= 5:
            flag, length = struct.unpack(">BI", self.buffer[:5])
            if flag & 1:
                self._fail_now("INTERNAL", f"{self.target} sent a compressed message, which this client does "
                               "not accept")
                return
            if length > self.max_message:
                self._fail_now("RESOURCE_EXHAUSTED", f"{self.target} sent a message of {length} bytes, more than "
                               f"the limit of {self.max_message}")
                return
            if len(self.buffer) < 5 + length:
                return
            self.messages.put(bytes(self.buffer[5:5 + length]))
            del self.buffer[:5 + length]

    # -- ending -----------------------------------------------------------------------------------

    def _end(self, status: GrpcError) -> None:
        """Record the outcome once (hold `lock`); an error before OK also resets the stream."""
        if self.status is not None:
            return
        if status.code == "OK" and self.buffer:
            status = GrpcError("INTERNAL", f"{self.target} ended the stream inside a message")
        self.status = status
        self.messages.put(None if status.code == "OK" else status)
        self.changed.notify_all()

    def _fail_now(self, code: str, details: str) -> None:
        self._end(GrpcError(code, details))
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)

    def _fail(self, code: str, details: str) -> None:
        with self.lock:
            self._fail_now(code, details)
            self._flush()

    @property
    def cancelled(self) -> bool:
        return self.canceller.cancelled

    def cancel(self) -> None:
        """End the call from any thread; a blocked reader wakes up with CANCELLED."""
        self.canceller.cancel()

    def close(self) -> None:
        with self.lock:
            if self.status is None:
                self._end(GrpcError("CANCELLED", "closed by the client"))
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                self.transport.send(self.conn.data_to_send())
        self.transport.close()


def _strings(headers: Any) -> list[tuple[str, str]]:
    return [(k if isinstance(k, str) else k.decode("latin-1"), v if isinstance(v, str) else v.decode("latin-1"))
            for k, v in headers or ()]


def _error_name(code: Any) -> str:
    return code.name if isinstance(code, h2.errors.ErrorCodes) else str(code)


class Channel:
    """Unary calls to one server.  A connection whose call ended cleanly is kept for the next call for
    `idle_timeout` seconds (less than a gRPC server's keepalive, which drops a client that does not answer
    its pings: an idle connection has no reader); calls at the same time each have their own."""

    def __init__(self, target: str, security: Security, *, max_message: int = DEFAULT_MAX_MESSAGE,
                 idle_timeout: float = 20.0) -> None:
        self.target = target
        self.security = security
        self.max_message = max_message
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle: list[tuple[float, _Call]] = []  # (idle since, connection)
        self._closed = False

    def _take(self) -> _Call | None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._idle:
                    return None
                since, call = self._idle.pop()
            if now - since < self.idle_timeout and call.idle_check():
                return call
            call.close()

    def _give_back(self, call: _Call) -> None:
        with self._lock:
            if not self._closed and call.reusable and not call.gone and not call.cancelled:
                self._idle.append((time.monotonic(), call))
                return
        call.close()

    def unary(self, method: str, request: bytes, *, timeout: float, metadata: Metadata = ()) -> bytes:
        """One request, one response; `GrpcError` unless the server answered OK with exactly one message."""
        headers = _headers_of(metadata)  # refused before dialling
        reused = self._take()
        if reused is not None:
            try:
                return self._unary(reused, method, request, timeout, headers)
            except GrpcError as exc:
                # The server closed the idle connection as the call began (nothing answered): once more
                # on a new one, as gRPC's transparent retry does.
                if exc.code != "UNAVAILABLE" or reused.http_status != 0:
                    raise
        call = _Call(self.target, self.security, max_message=self.max_message,
                     connect_timeout=min(CONNECT_TIMEOUT, timeout))
        return self._unary(call, method, request, timeout, headers)

    def _unary(self, call: _Call, method: str, request: bytes, timeout: float, headers: Metadata) -> bytes:
        try:
            call.start(method, metadata=headers, timeout=timeout)
            call.send(request, end=True)
            while not call.pump(call.deadline):
                pass
            assert call.status is not None
            if call.status.code != "OK":
                raise call.status
            replies = []
            while not call.messages.empty():
                item = call.messages.get_nowait()
                if isinstance(item, bytes):
                    replies.append(item)
            if len(replies) != 1:
                raise GrpcError("INTERNAL", f"{self.target} answered {method} with {len(replies)} messages, not one")
            return replies[0]
        finally:
            self._give_back(call)

    def close(self) -> None:
        """Close the idle connections; calls still running close theirs when they end."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, call in idle:
            call.close()


def unary_call(target: str, method: str, request: bytes, security: Security, *, timeout: float,
               metadata: Metadata = (), max_message: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """One call on a connection of its own (see `Channel` to reuse connections)."""
    channel = Channel(target, security, max_message=max_message)
    try:
        return channel.unary(method, request, timeout=timeout, metadata=metadata)
    finally:
        channel.close()


class Stream:
    """A bidirectional stream: `send` from one thread, `recv` from another (or the same); a thread of
    its own reads the connection, answers pings and keeps it alive."""

    def __init__(self, call: _Call, keepalive: tuple[float, float] | None) -> None:
        self._call = call
        call.inline = False
        self._keepalive = keepalive
        self._reader = threading.Thread(target=self._read, name=f"grpcwire-{call.target}", daemon=True)
        self._reader.start()

    @classmethod
    def open(cls, target: str, method: str, security: Security, *, metadata: Metadata = (),
             max_message: int = DEFAULT_MAX_MESSAGE, keepalive_time: float | None = None,
             keepalive_timeout: float = 10.0, connect_timeout: float = CONNECT_TIMEOUT,
             canceller: Canceller | None = None) -> Stream:
        """Connect and begin the stream; `canceller` may end it from another thread meanwhile."""
        call = _Call(target, security, max_message=max_message, connect_timeout=connect_timeout,
                     end_on_goaway=True, canceller=canceller)
        try:
            call.start(method, metadata=metadata)
        except GrpcError:
            call.close()
            raise
        return cls(call, None if keepalive_time is None else (keepalive_time, keepalive_timeout))

    def _read(self) -> None:
        call = self._call
        try:
            while not call.pump(None, keepalive=self._keepalive):
                pass
        except Exception as exc:  # never leave a reader waiting for ever
            with call.lock:
                call._end(GrpcError("INTERNAL", f"reading from {call.target} failed: {type(exc).__name__}: {exc}"))

    def send(self, message: bytes) -> None:
        """Queue `message` on the stream (blocks only while the server's window is full)."""
        self._call.send(message)

    def recv(self) -> bytes | None:
        """The next message; None when the server ended the stream with OK; `GrpcError` otherwise."""
        item = self._call.messages.get()
        if isinstance(item, GrpcError):
            self._call.messages.put(item)  # later calls see the same outcome
            raise item
        if item is None:
            self._call.messages.put(None)
        return item

    def cancel(self) -> None:
        self._call.cancel()

    def close(self) -> None:
        self._call.cancel()
        self._reader.join(5.0)
        self._call.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
