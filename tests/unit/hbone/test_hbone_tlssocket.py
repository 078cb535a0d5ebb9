"""The trio transport on TLS sockets (`mesh.hbone.tlssocket`): real TLS 1.3 on 127.0.0.1, SVIDs from the
mesh CA.  Writes the socket cannot take at once, bursts written by the writer task, a peer that is not
TLS, a silent peer, a peer that goes away."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import ssl
import struct
import termios
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hbone_helpers import SLEEP, WEB, Mint, Tls, echo_handler, hbone_server, tls_for

from mesh.hbone import transport
from mesh.hbone.client import open_hbone_connection
from mesh.hbone.errors import HandshakeError, TunnelReset
from mesh.hbone.events import ConnectRequested
from mesh.hbone.sides import HboneServer
from mesh.hbone.tlssocket import Received, TlsSocket, take_over, tls_over
from mesh.hbone.transport import _Output
from mesh.hbone.tunnel import YIELD_EVERY


@pytest.fixture(scope="module")
def tls(mint: Mint) -> Tls:
    return tls_for(mint(SLEEP), mint(WEB))


def run(fn: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


async def read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(1 << 20)
        assert data, f"the stream ended after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


@pytest.mark.parametrize("burst", [0.0, 3600.0], ids=["every-write-at-once", "all-by-the-writer-task"])
def test_writes_the_socket_cannot_take_at_once_arrive_whole_and_in_order(
    tls: Tls, burst: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small send buffer makes the socket refuse most of each write: the rest waits for the writer
    task, and nothing is lost or reordered.  With `burst` 0 every write is tried from the producing task;
    with an hour, everything after the connection's first write goes through the writer task."""
    monkeypatch.setattr(transport, "WRITE_BURST", burst)
    payload = hashlib.sha256(b"order").digest() * (6 * 1024 * 1024 // 32)

    async def main() -> None:
        async with hbone_server(tls.server, echo_handler) as (port, served), trio.open_nursery() as nursery:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            conn = await open_hbone_connection(nursery, tcp, tls.client, expected={WEB})
            tunnel = await conn.open_tunnel("10.244.1.5:8080")
            assert isinstance(conn._tls, TlsSocket) and isinstance(served[0]._tls, TlsSocket)
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await read_exactly(tunnel, len(payload)))

            await tunnel.send_all(payload[: 1 << 20])  # no other task ran: the server has not read yet
            if burst == 0.0:
                assert conn._output is _Output.BLOCKED, "the socket took 1 MiB at once: the writer task was not needed"
            else:  # left to the writer task: within the burst, or already found the socket full
                assert conn._output in (_Output.BURST, _Output.BLOCKED)
            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                for i in range(1 << 20, len(payload), 300_000):
                    await tunnel.send_all(payload[i : i + 300_000])
            assert hashlib.sha256(got[0]).digest() == hashlib.sha256(payload).digest()
            await tunnel.send_eof()
            assert await tunnel.receive_some() == b""
            nursery.cancel_scope.cancel()

    run(main)


def test_many_tunnels_at_once_each_get_their_own_bytes(tls: Tls) -> None:
    """Thirty tunnels on one connection send and read at once (their writes mostly go out together)."""

    async def main() -> None:
        async with hbone_server(tls.server, echo_handler) as (port, _), trio.open_nursery() as nursery:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn = await open_hbone_connection(nursery, tcp, tls.client, expected={WEB})
            results: dict[int, bytes] = {}

            async def one(n: int) -> None:
                tunnel = await conn.open_tunnel(f"10.244.1.{n}:80")
                message = f"tunnel {n} ".encode() * 50
                for _ in range(20):
                    await tunnel.send_all(message)
                    assert await read_exactly(tunnel, len(message)) == message
                results[n] = message
                await tunnel.aclose()

            async with trio.open_nursery() as inner:
                for n in range(30):
                    inner.start_soon(one, n)
            assert sorted(results) == list(range(30))
            nursery.cancel_scope.cancel()

    run(main)


def test_tunnel_calls_that_do_not_wait_stay_cancellable_and_let_other_tasks_run(tls: Tls) -> None:
    async def main() -> None:
        async with hbone_server(tls.server, echo_handler) as (port, _), trio.open_nursery() as nursery:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn = await open_hbone_connection(nursery, tcp, tls.client, expected={WEB})
            tunnel = await conn.open_tunnel("10.244.1.5:8080")
            turns = [0]

            async def other() -> None:
                while True:
                    turns[0] += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(other)
            await trio.sleep(0.01)
            seen = turns[0]
            for _ in range(2 * YIELD_EVERY):  # none of these waits: the window is open
                await tunnel.send_all(b"y")
            assert turns[0] > seen, "a loop of tunnel calls that never wait held the thread"
            reached = False
            with trio.CancelScope() as scope:
                scope.cancel()
                await tunnel.send_all(b"z")
                reached = True
            assert scope.cancelled_caught and not reached
            echoed = await read_exactly(tunnel, 2 * YIELD_EVERY)  # (the "z" may follow: it was queued)
            assert echoed.startswith(b"y" * 2 * YIELD_EVERY)
            nursery.cancel_scope.cancel()

    run(main)


async def _listen(nursery: trio.Nursery, on_connection: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(trio.serve_tcp, on_connection, 0)
    return int(listeners[0].socket.getsockname()[1])


def test_a_peer_that_is_not_tls_is_a_handshake_error_naming_it(tls: Tls) -> None:
    async def plain_http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _listen(nursery, plain_http)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises(HandshakeError, match=rf"TLS handshake with 127\.0\.0\.1:{port} failed"):
                await open_hbone_connection(nursery, tcp, tls.client, expected={WEB})
            nursery.cancel_scope.cancel()

    run(main)


def test_a_silent_peer_is_a_handshake_timeout_and_its_socket_is_closed(tls: Tls) -> None:
    closed = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        while await stream.receive_some(65536):  # the ClientHello, then nothing until the client gives up
            pass
        closed.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _listen(nursery, silent)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises(HandshakeError, match=r"took over 0\.3s"):
                await open_hbone_connection(nursery, tcp, tls.client, expected={WEB}, handshake_timeout=0.3)
            await closed.wait()  # the client closed its socket
            nursery.cancel_scope.cancel()

    run(main)


async def _send_now(tls: TlsSocket, data: bytes) -> None:
    if not tls.send(data):
        while not tls.flush():
            await trio.lowlevel.wait_writable(tls.sock)


def test_a_peer_that_goes_away_resets_the_tunnels_and_says_so(tls: Tls) -> None:
    """The server completes TLS and the HTTP/2 settings, reads the CONNECT, then drops the TCP connection
    (RST): the client's CONNECT fails naming the peer, and its connection is closed."""

    async def vanishing(stream: trio.SocketStream) -> None:
        server = TlsSocket.wrap(stream, tls.server, server_side=True)
        await server.do_handshake()
        proto = HboneServer()
        await _send_now(server, proto.data_to_send())
        connect_seen = False
        while not connect_seen:
            data, state = server.receive(65536)
            assert state is not Received.CLOSED and state is not Received.BROKEN, "the client left before its CONNECT"
            if not data:
                await trio.lowlevel.wait_readable(server.sock)
                continue
            connect_seen = any(isinstance(e, ConnectRequested) for e in proto.receive_data(data))
            await _send_now(server, proto.data_to_send())
        server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        server.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _listen(nursery, vanishing)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn = await open_hbone_connection(nursery, tcp, tls.client, expected={WEB})
            with pytest.raises(TunnelReset, match=rf"127\.0\.0\.1:{port}"):
                await conn.open_tunnel("10.244.1.5:8080")
            await conn.wait_closed()
            assert re.search(rf"connection to 127\.0\.0\.1:{port} broke|127\.0\.0\.1:{port} closed the connection",
                             conn.close_reason or ""), conn.close_reason
            nursery.cancel_scope.cancel()

    run(main)


def test_take_over_keeps_streams_that_are_not_tcp_sockets(tls: Tls) -> None:
    """A stream that is not a plain TCP socket (a test's wrapper, memory streams) keeps `trio.SSLStream`."""

    async def main() -> None:
        left, _right = trio.testing.memory_stream_pair()
        wrapped = trio.SSLStream(left, tls.server, server_side=True)
        assert take_over(wrapped) is wrapped
        assert isinstance(tls_over(left, tls.client, server_side=False), trio.SSLStream)
        await trio.lowlevel.checkpoint()

    run(main)


async def _tls_pair(tls: Tls) -> tuple[TlsSocket, TlsSocket, socket.socket]:
    """A client and a server TlsSocket over TCP on 127.0.0.1, handshake done; and a duplicate of the
    client's raw socket, to write bytes that are not TLS behind its back."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    raw_client = socket.socket(fileno=os.dup(a.fileno()))
    client = TlsSocket.wrap(trio.SocketStream(trio.socket.from_stdlib_socket(a)), tls.client, server_side=False)
    server = TlsSocket.wrap(trio.SocketStream(trio.socket.from_stdlib_socket(b)), tls.server, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server, raw_client


RECORD_1000 = 5 + 1000 + 1 + 16  # a TLS 1.3 record of 1,000 bytes: header, content type, AEAD tag


async def _all_arrived(sock: socket.socket, size: int) -> None:
    """Wait until `size` bytes are in the socket's receive queue (loopback may deliver in steps)."""
    while struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0] < size:
        await trio.sleep(0.001)


async def _receive_until(tls: TlsSocket, size: int) -> tuple[bytes, list[Received]]:
    got, states = b"", []
    while len(got) < size:
        data, state = tls.receive(1 << 20)
        got += data
        states.append(state)
        if state is Received.WAIT:
            await trio.lowlevel.wait_readable(tls.sock)
        elif state is not Received.MORE:
            break
    return got, states


def test_records_that_arrived_together_come_out_of_one_receive_and_a_limit_leaves_the_rest(tls: Tls) -> None:
    """Twenty records sent before the peer reads are all decrypted by one `receive` (one read of the
    socket, fed to TLS at once); with a limit, that many bytes and MORE, then the rest."""

    async def main() -> None:
        client, server, raw = await _tls_pair(tls)
        try:
            records = [bytes([i]) * 1000 for i in range(20)]
            for record in records:
                await _send_now(client, record)
            await _all_arrived(server.sock, len(records) * RECORD_1000)
            data, state = server.receive(1 << 20)
            assert (data, state) == (b"".join(records), Received.WAIT)
            for record in records:
                await _send_now(client, record)
            await _all_arrived(server.sock, len(records) * RECORD_1000)
            first, state = server.receive(2500)
            assert (first, state) == (b"".join(records)[:2500], Received.MORE)  # up to the limit
            rest, state = server.receive(1 << 20)
            assert (rest, state) == (b"".join(records)[2500:], Received.WAIT)
            assert server.receive(1 << 20) == (b"", Received.WAIT)  # nothing more: wait for the socket
        finally:
            client.close(), server.close(), raw.close()

    run(main)


@pytest.mark.parametrize("how", ["fin", "close_notify"])
def test_the_peer_closing_is_closed_after_what_it_sent_before(tls: Tls, how: str) -> None:
    """A peer that closes (a TCP FIN without TLS's close_notify, or with it): what it sent before comes
    out first, then CLOSED."""

    async def main() -> None:
        client, server, raw = await _tls_pair(tls)
        try:
            await _send_now(client, b"last words")
            if how == "close_notify":
                with contextlib.suppress(ssl.SSLWantReadError):  # (then it would wait for the peer's)
                    client._obj.unwrap()  # close_notify into the outgoing buffer
                assert client.flush()
            raw.shutdown(socket.SHUT_WR)
            got, states = await _receive_until(server, len(b"last words") + 1)
            assert got == b"last words" and states[-1] is Received.CLOSED, states
        finally:
            client.close(), server.close(), raw.close()

    run(main)


def test_bytes_that_are_not_tls_after_the_handshake_break_the_connection_and_say_why(tls: Tls) -> None:
    """An application-data record that does not decrypt (bytes written by something else on the
    connection): BROKEN, with OpenSSL's error, after whatever good data came before it."""

    async def main() -> None:
        client, server, raw = await _tls_pair(tls)
        try:
            await _send_now(client, b"good")
            raw.send(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a record of the right shape, not encrypted
            got, states = await _receive_until(server, 1 << 20)
            assert got == b"good" and states[-1] is Received.BROKEN, states
            assert isinstance(server.error, ssl.SSLError)
        finally:
            client.close(), server.close(), raw.close()

    run(main)


def test_an_hbone_peer_that_sends_garbage_after_the_handshake_closes_the_connection_naming_it(tls: Tls) -> None:
    """The server completes TLS, then writes bytes that are not TLS on the socket: the client's
    connection closes, its reason naming the peer and the TLS failure."""

    async def garbage(stream: trio.SocketStream) -> None:
        dup = socket.socket(fileno=os.dup(stream.socket.fileno()))
        server = TlsSocket.wrap(stream, tls.server, server_side=True)
        try:
            await server.do_handshake()
            dup.send(b"\x17\x03\x03\x00\x20" + b"\x01" * 32)
            await trio.sleep_forever()
        finally:
            dup.close()
            server.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await _listen(nursery, garbage)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            conn = await open_hbone_connection(nursery, tcp, tls.client, expected={WEB})
            await conn.wait_closed()
            assert re.search(rf"connection to 127\.0\.0\.1:{port} broke: .*(decrypt|mac|record)",
                             conn.close_reason or "", re.IGNORECASE), conn.close_reason
            nursery.cancel_scope.cancel()

    run(main)
