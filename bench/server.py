"""The benchmark's server: HTTP/1.1 answering every request with a 1 KiB body, and a byte sink.

The same server runs in every mode, so that only the path between client and server changes.  It is
stdlib only (it runs in the pod with whatever Python the pod has) and kept fast: one epoll loop with
non-blocking sockets, keep-alive, no per-request allocation beyond the received bytes, a prebuilt
response.  `--workers N` forks N such loops sharing the port through SO_REUSEPORT.

    python3 server.py [--http-port 8080] [--more-http-ports 8081,8082] [--sink-port 9090] [--body 1024] [--workers 1]

`--more-http-ports` serves the same answers on more ports, in the same loop (the scale phase spreads its
idle connections over several ports: the node agents connect to the application from the client's address
and a port of their own, and one client address and application port only leave so many).

Sink protocol (the single-stream throughput phase): the client sends an 8-byte big-endian length, then
that many bytes; once all have arrived the server answers with the same 8 bytes and closes.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import struct
import sys
import threading

RECV_SIZE = 65536
SINK_CHUNK = 1 << 20


def response_bytes(body_size: int) -> bytes:
    body = (b"0123456789abcdef" * (body_size // 16 + 1))[:body_size]
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {body_size}\r\n"
            "\r\n").encode()
    return head + body


def complete_requests(buf: bytearray) -> tuple[int, bool, bool]:
    """Count whole requests at the front of `buf` and remove them.  Returns (requests, close, bad):
    `close` when a request asked for `Connection: close`, `bad` when the bytes are not HTTP."""
    n = 0
    close = False
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return n, close, len(buf) > 65536
        head = bytes(buf[:end]).lower()
        length = 0
        pos = head.find(b"\r\ncontent-length:")
        if pos >= 0:
            line_end = head.find(b"\r\n", pos + 2)
            try:
                length = int(head[pos + 17:line_end if line_end >= 0 else None].strip())
            except ValueError:
                return n, True, True
        if len(buf) < end + 4 + length:
            return n, close, False
        if b"\r\nconnection: close" in head:
            close = True
        del buf[:end + 4 + length]
        n += 1


def serve_http(ports: list[int], body_size: int) -> None:
    response = response_bytes(body_size)
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    for port in ports:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(1024)
        listener.setblocking(False)
        ep.register(listener.fileno(), select.EPOLLIN)
        listeners[listener.fileno()] = listener
    conns: dict[int, tuple[socket.socket, bytearray]] = {}

    def drop(fd: int) -> None:
        sock, _ = conns.pop(fd)
        ep.unregister(fd)
        sock.close()

    while True:
        for fd, _events in ep.poll():
            accepting = listeners.get(fd)
            if accepting is not None:
                while True:
                    try:
                        sock, _ = accepting.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = (sock, bytearray())
                    ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                continue
            sock, buf = conns[fd]
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(fd)
                continue
            if not data:
                drop(fd)
                continue
            buf += data
            n, close, bad = complete_requests(buf)
            try:
                if n:
                    # Responses are small: with an empty send buffer they go out whole; fall back to a
                    # blocking send for the rare partial write rather than keeping write state.
                    out = response * n
                    sent = sock.send(out)
                    if sent < len(out):
                        sock.setblocking(True)
                        sock.sendall(out[sent:])
                        sock.setblocking(False)
            except OSError:
                drop(fd)
                continue
            if close or bad:
                drop(fd)


def serve_sink(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_sink_one, args=(sock,), daemon=True).start()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed early")
        out += chunk
    return bytes(out)


def _sink_one(sock: socket.socket) -> None:
    with sock:
        try:
            header = _recv_exactly(sock, 8)
            (remaining,) = struct.unpack("!Q", header)
            buf = bytearray(SINK_CHUNK)
            view = memoryview(buf)
            while remaining > 0:
                got = sock.recv_into(view, min(SINK_CHUNK, remaining))
                if not got:
                    return
                remaining -= got
            sock.sendall(header)
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--more-http-ports", default="", metavar="LIST", help="more HTTP ports, comma separated")
    p.add_argument("--sink-port", type=int, default=9090)
    p.add_argument("--body", type=int, default=1024, help="response body size in bytes (default 1024)")
    p.add_argument("--workers", type=int, default=1, help="HTTP worker processes (default 1)")
    args = p.parse_args(argv)
    try:
        http_ports = [args.http_port, *(int(x) for x in args.more_http_ports.split(",") if x.strip())]
    except ValueError:
        p.error(f"--more-http-ports {args.more_http_ports}: write port numbers, comma separated")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=serve_sink, args=(args.sink_port,), daemon=True).start()
    for _ in range(max(0, args.workers - 1)):
        if os.fork() == 0:
            serve_http(http_ports, args.body)
            return 0
    serve_http(http_ports, args.body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
