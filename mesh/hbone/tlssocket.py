"""TLS for the trio HBONE transport: OpenSSL over memory buffers on a non-blocking TCP socket that this
module reads and writes itself, driven by trio's readiness waits.

`trio.SSLStream` also runs OpenSSL over memory buffers, but moves every record through the transport
stream's own task-level calls: a copy and a scheduling round trip per read and per write.  Here the
socket is read and written with plain system calls, and trio only says when it is readable or writable
(`trio.lowlevel.wait_readable`/`wait_writable`): one `recv` of up to RECEIVE_SIZE per wake-up, fed to
the `ssl.SSLObject` and decrypted in one loop (a TLS socket would read each record's header and body
in two system calls: Python's `ssl` has no read-ahead), and a write encrypted into the outgoing buffer
and sent in one `send` from the task that produced the bytes (see 'Performance' in
docs/ARCHITECTURE.md).

    tls = TlsSocket.wrap(tcp_stream, ssl_context, server_side=True)   # takes over tcp_stream's socket
    await tls.do_handshake()
    data, more = tls.receive(limit)   # the driver in `mesh.hbone.transport` does the reading and writing
    done = tls.send(data)             # False: ciphertext is left; `flush()` once `tls.sock` is writable

`tls_over(transport, ...)` picks this for a plain TCP `trio.SocketStream` and falls back to
`trio.SSLStream` for any other stream (a wrapper in a test, a stream that is not a socket).
"""

from __future__ import annotations

import enum
import socket
import ssl
import threading
from typing import Any, cast

import trio

RECEIVE_SIZE = 256 * 1024  # bytes taken from the socket in one recv


class _Scratch(threading.local):
    """Buffers every TlsSocket of a thread reads into, emptied before `receive` returns (one `recv` of
    RECEIVE_SIZE into a fresh bytes object costs a large allocation, ten times the system call)."""

    def __init__(self) -> None:
        self.cipher = bytearray(RECEIVE_SIZE)
        self.cipher_view = memoryview(self.cipher)
        self.plain_view = memoryview(bytearray(RECEIVE_SIZE))


_scratch = _Scratch()  # this thread's buffers (a `threading.local`)


class Received(enum.Enum):
    """What `TlsSocket.receive` found after the bytes it returns."""

    WAIT = "nothing more has arrived: wait for the socket to be readable"
    MORE = "the limit was reached: more may be there already"
    CLOSED = "the peer closed the connection (TCP FIN or TLS close_notify)"
    BROKEN = "the connection broke (`TlsSocket.error` says how)"


class TlsSocket:
    """One TLS connection over a non-blocking TCP socket (`sock`) that this object owns (`close` closes
    it).  Only one task receives at a time; sends and receives may interleave (TLS 1.3 has no
    renegotiation, so neither direction ever waits for the other)."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.sock = sock
        self.name = _address(sock)
        self._obj = obj
        self._incoming = incoming
        self._outgoing = outgoing
        self._unsent: bytes | memoryview = b""  # ciphertext the socket did not take yet
        self.error: OSError | None = None  # why `receive` found the connection BROKEN

    @classmethod
    def wrap(cls, transport: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool,
             server_hostname: str | None = None) -> TlsSocket:
        """Take `transport`'s socket over (the stream is left without one: closing it is harmless) and
        run TLS over it with `context`; the handshake is not done yet."""
        raw = socket.socket(fileno=transport.socket.detach())
        try:
            raw.setblocking(False)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise
        return cls(raw, obj, incoming, outgoing)

    async def do_handshake(self) -> None:
        """The TLS handshake; raises `ssl.SSLError` or `OSError` when it fails (the caller bounds its time)."""
        obj = self._obj
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            await self._flush_all()
            if done:
                return
            await trio.lowlevel.wait_readable(self.sock)
            self._recv()

    async def _flush_all(self) -> None:
        while not self.send(b""):
            await trio.lowlevel.wait_writable(self.sock)

    def _recv(self) -> int | None:
        """One `recv` into this thread's scratch buffer, fed to TLS; the byte count (0: the peer's FIN),
        None when nothing has arrived."""
        scratch = _scratch
        try:
            n = self.sock.recv_into(scratch.cipher)
        except (BlockingIOError, InterruptedError):
            return None
        if n:
            self._incoming.write(scratch.cipher_view[:n])
        else:
            self._incoming.write_eof()
        return n

    @property
    def unsent(self) -> bool:
        """Ciphertext is waiting for the socket to be writable (`flush`)."""
        return bool(self._unsent)

    def receive(self, limit: int) -> tuple[bytes, Received]:
        """What arrived, decrypted, up to `limit` bytes (at most RECEIVE_SIZE), without waiting, and what
        comes after it: WAIT, MORE, CLOSED or BROKEN (the bytes before a failure are returned with it;
        `error` is the failure).  Bytes TLS itself must send (a key update's answer) are sent, or left
        for `flush` (`unsent`)."""
        obj, incoming = self._obj, self._incoming
        plain = _scratch.plain_view
        limit = min(limit, RECEIVE_SIZE)
        size = 0
        state = Received.WAIT
        drained = False  # a recv returned less than it asked for: the socket had no more then
        while True:
            # decrypt while there is ciphertext (a read with none would only raise SSLWantReadError)
            if incoming.pending or obj.pending():
                try:
                    # (with a buffer, `read` fills it and returns a count; typeshed knows only bytes)
                    n = cast(int, obj.read(limit - size, cast(bytearray, plain[size:])))
                except ssl.SSLWantReadError:  # a record not all here yet
                    n = -1
                except ssl.SSLEOFError:  # the stream ended inside a record: a close all the same
                    n = 0
                except OSError as exc:  # ssl.SSLError included
                    self.error = exc
                    state = Received.BROKEN
                    break
                if n > 0:
                    size += n
                    if size >= limit:
                        state = Received.MORE
                        break
                    continue
                if n == 0:  # close_notify
                    state = Received.CLOSED
                    break
            if incoming.eof:
                state = Received.CLOSED
                break
            if drained:  # no recv only to learn that nothing more came: the readiness wait says so
                break
            try:
                got = self._recv()
            except OSError as exc:
                self.error = exc
                state = Received.BROKEN
                break
            if got is None:
                break
            drained = 0 < got < RECEIVE_SIZE
        if self._outgoing.pending and state is not Received.BROKEN:
            try:
                self.send(b"")
            except OSError as exc:
                self.error = exc
                state = Received.BROKEN
        return (bytes(plain[:size]) if size else b""), state

    def send(self, data: bytes | memoryview) -> bool:
        """Encrypt `data` (all of it is taken) and send what the socket takes now; False when some
        ciphertext is left (`flush` it once `sock` is writable).  Raises `OSError` when sending failed."""
        if data:
            self._obj.write(data)
        if self._unsent:
            return False  # behind bytes the socket did not take yet: they go in order, by `flush`
        out = self._outgoing.read()
        if not out:
            return True
        sent = self._send_some(out)
        if sent == len(out):
            return True
        self._unsent = memoryview(out)[sent:]
        return False

    def flush(self) -> bool:
        """Send ciphertext left by `send`; True when none is left."""
        while True:
            if not self._unsent:
                self._unsent = self._outgoing.read()
                if not self._unsent:
                    return True
            unsent = self._unsent
            sent = self._send_some(unsent)
            if sent < len(unsent):
                self._unsent = memoryview(unsent)[sent:]
                return False
            self._unsent = b""

    def _send_some(self, data: bytes | memoryview) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._obj.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def close(self) -> None:
        """Close the socket at once (no close_notify), waking any task waiting on it."""
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def tls_over(transport: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool,
             server_hostname: str | None = None) -> TlsSocket | trio.SSLStream[trio.abc.Stream]:
    """TLS over a connected `transport` (handshake not done): on its socket when it is a plain TCP
    `trio.SocketStream`, else a `trio.SSLStream` around it."""
    if type(transport) is trio.SocketStream:
        return TlsSocket.wrap(transport, context, server_side=server_side, server_hostname=server_hostname)
    if server_side:
        return trio.SSLStream(transport, context, server_side=True)
    return trio.SSLStream(transport, context, server_hostname=server_hostname)


def take_over(stream: trio.SSLStream[Any]) -> TlsSocket | trio.SSLStream[Any]:
    """The same connection on its socket, for a `trio.SSLStream` whose handshake has not started and
    whose transport is a plain TCP `trio.SocketStream`; any other stream is returned as it is."""
    transport = stream.transport_stream
    if type(transport) is not trio.SocketStream or transport.socket.fileno() == -1:
        return stream
    return TlsSocket.wrap(transport, stream.context, server_side=stream.server_side,
                          server_hostname=stream.server_hostname)


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
