"""TLS for the trio HBONE transport on a non-blocking `ssl.SSLSocket`, driven by trio's readiness waits.

`trio.SSLStream` runs OpenSSL over memory buffers and moves every record through the transport stream's
own task-level calls: a copy and a scheduling round trip per read and per write.  Here OpenSSL reads and
writes the TCP socket itself, and trio only says when it is readable or writable
(`trio.lowlevel.wait_readable`/`wait_writable`), so a write is one `send` from the task that produced the
bytes and a read needs no other task (see 'Performance' in docs/ARCHITECTURE.md for what it saves, and
what it costs: OpenSSL reads a record's header and its body in two system calls).

    tls = TlsSocket.wrap(tcp_stream, ssl_context, server_side=True)   # takes over tcp_stream's socket
    await tls.do_handshake()
    data = tls.sock.recv(...)   # the driver in `mesh.hbone.transport` does the reading and writing

`tls_over(transport, ...)` picks this for a plain TCP `trio.SocketStream` and falls back to
`trio.SSLStream` for any other stream (a wrapper in a test, a stream that is not a socket).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio


class TlsSocket:
    """One TLS connection on a non-blocking `ssl.SSLSocket` that this object owns (`close` closes it).
    `getpeercert` and `selected_alpn_protocol` are the socket's."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.name = _address(sock)

    @classmethod
    def wrap(cls, transport: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool,
             server_hostname: str | None = None) -> TlsSocket:
        """Take `transport`'s socket over (the stream is left without one: closing it is harmless) and
        wrap it with `context`; the handshake is not done yet."""
        raw = socket.socket(fileno=transport.socket.detach())
        try:
            raw.setblocking(False)
            sock = context.wrap_socket(raw, server_side=server_side, server_hostname=server_hostname,
                                       do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        return cls(sock)

    async def do_handshake(self) -> None:
        """The TLS handshake; raises `ssl.SSLError` or `OSError` when it fails (the caller bounds its time)."""
        sock = self.sock
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(sock)

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.sock.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self.sock.selected_alpn_protocol()

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
