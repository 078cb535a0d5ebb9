"""`Tunnel`: one HBONE stream (an HTTP/2 CONNECT) as a `trio.abc.HalfCloseableStream`.

A tunnel turns the trio stream calls (`send_all`, `receive_some`, `send_eof`, `aclose`) into calls on the
sans-IO core and waits on its own parking lot; the connection driver that carries it
(`mesh.hbone.transport`) hands it the core's events (`_on_data`, `_on_eof`, `_on_reset`, `_on_answer`,
`_wake`) and writes what the core produced when the tunnel kicks it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import trio

from mesh.hbone.errors import TunnelReset
from mesh.hbone.events import Event, StreamAccepted, StreamRejected
from mesh.hbone.frames import ErrorCode
from mesh.hbone.protocol import HboneConnection
from mesh.hbone.state import SENDING_STATES, TERMINAL_STREAM_STATES

SEND_CHUNK = 256 * 1024  # a tunnel's send_all hands the core this much, then waits for window if needed
DRAIN_ON_CLOSE = 5.0  # seconds a tunnel's aclose() waits for its queued bytes to go out
YIELD_EVERY = 16  # a tunnel call that did not wait yields to other tasks once in this many calls


class _Driver(Protocol):
    """What a tunnel needs of the connection that carries it (`mesh.hbone.transport._Driver`)."""

    @property
    def proto(self) -> HboneConnection: ...

    def kick(self) -> None: ...

    def _dispatch(self, events: Sequence[Event]) -> None: ...

    def release(self, tunnel: Tunnel) -> None: ...


_calls = itertools.count()


async def _checkpoint() -> None:
    """A tunnel call that did not have to wait: a cancellation point every time, but a yield to other
    tasks only every YIELD_EVERY-th time.  A yield is a trip through trio's run queue (and often its I/O
    poll), while such a call is a buffer update.  A loop of them still cannot hold the thread: the inbox
    empties, the send window runs out, and every YIELD_EVERY-th call yields anyway."""
    if next(_calls) % YIELD_EVERY:
        await trio.lowlevel.checkpoint_if_cancelled()
    else:
        await trio.lowlevel.checkpoint()


class Tunnel(trio.abc.HalfCloseableStream):
    """One HBONE stream as a trio byte stream: `send_all`, `receive_some`, `send_eof` (END_STREAM, the
    FIN), `aclose`.  A reset tunnel raises `TunnelReset` (a `trio.BrokenResourceError`)."""

    def __init__(self, driver: _Driver, stream_id: int, authority: str) -> None:
        self._driver = driver
        self.stream_id = stream_id
        self.authority = authority
        self.bytes_sent = 0
        self.bytes_received = 0
        self._inbox = bytearray()
        self._eof = False
        self._error: str | None = None
        self._answer: StreamAccepted | StreamRejected | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._send_busy = False
        self._receive_busy = False
        self._closed = False

    @property
    def _proto(self) -> HboneConnection:
        return self._driver.proto

    def __repr__(self) -> str:
        return f"<Tunnel {self.authority} stream {self.stream_id}>"

    # events from the driver
    def _on_data(self, data: bytes | memoryview, flow_controlled_length: int) -> None:
        self._inbox += data
        padding = flow_controlled_length - len(data)
        if padding > 0:
            self._proto.acknowledge(self.stream_id, padding)
        self._lot.unpark_all()

    def _on_eof(self) -> None:
        self._eof = True
        self._lot.unpark_all()

    def _on_reset(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._lot.unpark_all()

    def _on_answer(self, answer: StreamAccepted | StreamRejected) -> None:
        self._answer = answer
        self._lot.unpark_all()

    def _wake(self) -> None:
        self._lot.unpark_all()

    # trio stream interface
    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this tunnel was closed")
        if self._error is not None:
            raise TunnelReset(f"tunnel to {self.authority}: {self._error}")
        state = self._proto.stream_state(self.stream_id)
        if state is None or state in TERMINAL_STREAM_STATES:
            raise TunnelReset(f"tunnel to {self.authority} is finished")
        if state not in SENDING_STATES:
            raise trio.ClosedResourceError(f"tunnel to {self.authority} was half-closed (send_eof)")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this tunnel")
        self._send_busy = True
        try:
            size = len(data)
            if not size:
                self._check_can_send()
            parked = False
            for start in range(0, size, SEND_CHUNK):
                while True:
                    self._check_can_send()
                    if self._proto.can_send(self.stream_id):
                        break
                    await self._lot.park()
                    parked = True
                if isinstance(data, bytes) and size <= SEND_CHUNK:
                    chunk = data  # immutable: the core may keep it as it is
                else:
                    chunk = bytes(memoryview(data)[start : start + SEND_CHUNK])  # one copy
                self._proto.send_data(self.stream_id, chunk)
                self.bytes_sent += len(chunk)
                self._driver.kick()
            if not parked:
                await _checkpoint()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        while not self._proto.can_send(self.stream_id):
            self._check_can_send()
            await self._lot.park()

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this tunnel")
        if self._closed:
            raise trio.ClosedResourceError("this tunnel was closed")
        state = self._proto.stream_state(self.stream_id)
        if state in SENDING_STATES:
            self._driver._dispatch(self._proto.end_stream(self.stream_id))
            self._driver.kick()
        elif self._error is not None:
            raise TunnelReset(f"tunnel to {self.authority}: {self._error}")
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receive_busy:
            raise trio.BusyResourceError("another task is receiving on this tunnel")
        if self._closed:
            raise trio.ClosedResourceError("this tunnel was closed")
        self._receive_busy = True
        try:
            parked = False
            while not self._inbox and not self._eof and self._error is None:
                await self._lot.park()
                parked = True
            if not parked:
                await _checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this tunnel was closed")
            inbox = self._inbox
            if inbox:
                n = len(inbox) if max_bytes is None else min(max_bytes, len(inbox))
                if n == len(inbox):
                    data = bytes(inbox)
                    inbox.clear()
                else:
                    data = bytes(memoryview(inbox)[:n])
                    del inbox[:n]
                self.bytes_received += n
                self._proto.acknowledge(self.stream_id, n)
                self._driver.kick()
                return data
            if self._eof:
                return b""
            raise TunnelReset(f"tunnel to {self.authority}: {self._error}")
        finally:
            self._receive_busy = False

    async def aclose(self) -> None:
        """Finish the tunnel: END_STREAM after queued bytes if not sent yet; if the peer is still sending,
        reset (CANCEL) once ours went out, as closing a socket with unread data does."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._lot.unpark_all()
        proto, sid = self._proto, self.stream_id
        try:
            if proto.stream_state(sid) in SENDING_STATES:
                self._driver._dispatch(proto.end_stream(sid))
                self._driver.kick()
            with trio.move_on_after(DRAIN_ON_CLOSE):
                while proto.buffered(sid) and self._error is None:
                    await self._lot.park()
            await trio.lowlevel.checkpoint()
        finally:
            # A no-op when both sides already finished.
            self._driver._dispatch(proto.reset(sid, ErrorCode.CANCEL))
            self._inbox.clear()
            self._driver.release(self)
