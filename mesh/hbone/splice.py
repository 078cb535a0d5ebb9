"""The relay on the engine: two ends joined so that each one's bytes are written to the other from the
callback that received them (no task, no queue, no wake-up in between).

An end is a TCP connection (`PlainEnd`, an asyncio Protocol) or an HBONE tunnel
(`mesh.hbone.aio.TunnelEnd`); `Splice(a, b)` joins them and `await splice.done` gives the
`RelayResult`, with the meaning of `mesh.hbone.relay.relay` (the trio relay, which the waypoint uses):

- half-close: when one end finishes sending (FIN, or END_STREAM), the other is half-closed and the
  opposite direction goes on; once both have, both ends are closed;
- failure: when either end fails (reset, broken connection), both are closed abortively;
  `RelayResult.failed` names the end that broke;
- backpressure: when the end written to is full (its transport over its high-water mark, or the
  tunnel's window used up), the end read from stops reading until it drains;
- counting: bytes each way, and a `counter` told of every chunk (the node agent's connection metrics).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from mesh.hbone.relay import ByteCounter, RelayResult, Side

EARLY_LIMIT = 256 * 1024  # bytes an end keeps before it is joined; then it stops reading
_SIDES: tuple[Side, Side] = ("a", "b")


class End(Protocol):
    """What a splice needs of each end."""

    writable: bool  # False once a write filled it up: the splice stops the other end reading

    def attach(self, splice: Splice, side: int) -> None: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def write_eof(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Splice:
    """Joins two ends; `done` is the `RelayResult` once both directions ended (or one failed)."""

    __slots__ = ("_a", "_b", "counts", "_ended", "done", "_tell")

    def __init__(self, a: End, b: End, counter: ByteCounter | None = None) -> None:
        self._a, self._b = a, b
        self.counts = [0, 0]
        self._ended = [False, False]
        self.done: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()
        self._tell = (counter.add_received, counter.add_sent) if counter is not None else None
        a.attach(self, 0)
        b.attach(self, 1)

    # -- what the ends call -------------------------------------------------------------------------------

    def data(self, side: int, data: bytes | memoryview) -> None:
        """`side` received `data`: write it to the other end, from this very callback."""
        if self.done.done():
            return
        src, dst = (self._a, self._b) if side == 0 else (self._b, self._a)
        dst.write(data)
        n = len(data)
        self.counts[side] += n
        if self._tell is not None:
            self._tell[side](n)
        if not dst.writable:
            src.pause_reading()

    def sent_ahead(self, side: int, n: int) -> None:
        """`side` received `n` bytes that were written to the other end before the join (early data):
        counted, not written again."""
        self.counts[side] += n
        if self._tell is not None:
            self._tell[side](n)

    def drained(self, side: int) -> None:
        """`side` takes writes again: the other end may read on."""
        if not self.done.done():
            (self._b if side == 0 else self._a).resume_reading()

    def ended(self, side: int) -> None:
        """`side` finished sending: half-close the other end; once both have, close both."""
        if self.done.done() or self._ended[side]:
            return
        self._ended[side] = True
        (self._b if side == 0 else self._a).write_eof()
        if self._ended[0] and self._ended[1]:
            self._a.close()
            self._b.close()
            self.done.set_result(RelayResult(self.counts[0], self.counts[1]))
            self._let_go()

    def failed(self, side: int, reason: str) -> None:
        """`side` broke: abort both ends."""
        if self.done.done():
            return
        self.done.set_result(RelayResult(self.counts[0], self.counts[1],
                                         f"{_SIDES[side]}->{_SIDES[1 - side]}: {reason}", _SIDES[side]))
        self._a.abort()
        self._b.abort()
        self._let_go()

    def _let_go(self) -> None:
        """Once done: no reference to the ends is kept (each end refers to the splice), so that a
        finished relay is freed when its last reference goes, not by a pass of the cyclic collector.
        Every method looks at `done` before it looks at the ends."""
        self._a = self._b = None  # type: ignore[assignment]


class PlainEnd(asyncio.Protocol):
    """A TCP connection as an end.  Bytes that arrive before it is joined are kept (up to
    `EARLY_LIMIT`, then it stops reading) and handed over when it is; `send_ahead` also writes them,
    as they come, to an end not joined yet (a tunnel whose CONNECT awaits its answer)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.writable = True
        self._splice: Splice | None = None
        self._side = 0
        self._early: list[bytes] = []
        self._early_size = 0
        self._early_end: str | None = None  # "eof", or the error, that came before the join
        self._ahead: End | None = None  # where early bytes are written before the join
        self._ahead_sent = 0  # how many of `_early` were written there

    def send_ahead(self, end: End | None) -> None:
        """Write the bytes kept so far, and those that come until the join, to `end` too, while it
        takes them (`writable`); None stops (what was written stays counted for the join).  They stay
        kept: the join counts those written ahead without writing them again, and another
        `send_ahead` (the CONNECT opened elsewhere) writes them all again."""
        self._ahead = end
        if end is not None:
            self._ahead_sent = 0
            self._write_ahead(end)

    def _write_ahead(self, end: End) -> None:
        early = self._early
        while self._ahead_sent < len(early) and end.writable:
            end.write(early[self._ahead_sent])
            self._ahead_sent += 1

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        splice = self._splice
        if splice is not None:
            splice.data(self._side, data)
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._ahead is not None:
            self._write_ahead(self._ahead)
        if self._early_size >= EARLY_LIMIT:
            self.pause_reading()

    def eof_received(self) -> bool:
        if self._splice is not None:
            self._splice.ended(self._side)
        elif self._early_end is None:
            self._early_end = "eof"
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        splice = self._splice
        if splice is None:
            if exc is not None:
                self._early_end = str(exc) or type(exc).__name__
            elif self._early_end is None:
                self._early_end = "closed"
            return
        if exc is not None:
            splice.failed(self._side, str(exc) or type(exc).__name__)
        elif not splice.done.done():
            splice.failed(self._side, "connection closed")

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self._splice is not None:
            self._splice.drained(self._side)

    # End
    def attach(self, splice: Splice, side: int) -> None:
        self._splice, self._side = splice, side
        early, self._early = self._early, []
        ahead, self._ahead_sent, self._ahead = self._ahead_sent, 0, None
        for i, data in enumerate(early):
            if i < ahead:
                splice.sent_ahead(side, len(data))
            else:
                splice.data(side, data)
        if self._early_size >= EARLY_LIMIT:
            self.resume_reading()
        self._early_size = 0
        if self._early_end == "eof":
            splice.ended(side)
        elif self._early_end is not None:
            splice.failed(side, self._early_end)

    def write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def pause_reading(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_end(sock: socket.socket) -> PlainEnd:
    """A connected socket as an end (on the running loop)."""
    _, end = await asyncio.get_running_loop().create_connection(PlainEnd, sock=sock)
    return end


async def relay_ends(a: End, b: End, counter: ByteCounter | None = None) -> RelayResult:
    """Join `a` and `b` until both directions ended; cancelling this aborts both."""
    splice = Splice(a, b, counter)
    try:
        return await splice.done
    except asyncio.CancelledError:
        a.abort()
        b.abort()
        raise
