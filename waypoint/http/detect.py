"""Which protocol a tunnel carries, from its first bytes (pure), and a stream that replays them.

HTTP/2 with prior knowledge starts with the connection preface; HTTP/1.x with a method token and a space;
anything else (TLS, databases, ...) is passed through as L4.  Detection waits for at most
`DETECT_BYTES` bytes or `detect_timeout` seconds (server-first protocols send nothing: they are L4).
"""

from __future__ import annotations

import enum

import trio

from waypoint.http.http2 import PREFACE

METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
DETECT_BYTES = len(PREFACE)


class Protocol(enum.Enum):
    HTTP1 = "HTTP/1.1"
    HTTP2 = "HTTP/2"
    OPAQUE = "tcp"
    UNDECIDED = "undecided"


def sniff(prefix: bytes) -> Protocol:
    """The protocol `prefix` starts, or UNDECIDED while more bytes could still change the answer."""
    if not prefix:
        return Protocol.UNDECIDED
    n = min(len(prefix), len(PREFACE))
    if prefix[:n] == PREFACE[:n]:
        return Protocol.HTTP2 if n == len(PREFACE) else Protocol.UNDECIDED
    for m in METHODS:
        token = m + b" "
        k = min(len(prefix), len(token))
        if prefix[:k] == token[:k]:
            return Protocol.HTTP1 if k == len(token) else Protocol.UNDECIDED
    return Protocol.OPAQUE


async def detect(stream: trio.abc.Stream, timeout: float = 5.0) -> tuple[Protocol, bytes]:
    """Read until the protocol is known; returns it with the bytes read (to be replayed)."""
    buf = b""
    with trio.move_on_after(timeout):
        while True:
            verdict = sniff(buf)
            if verdict is not Protocol.UNDECIDED:
                return verdict, buf
            data = await stream.receive_some(DETECT_BYTES)
            if not data:
                break
            buf += bytes(data)
    verdict = sniff(buf)
    return (Protocol.OPAQUE if verdict is Protocol.UNDECIDED else verdict), buf


class PrefixedStream(trio.abc.HalfCloseableStream):
    """`inner` with `prefix` put back in front of what it receives."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = max_bytes or len(self._prefix)
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()
