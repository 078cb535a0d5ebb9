"""HBONE over trio: the connection driver, which runs the sans-IO core over a TLS connection.

Over a TCP socket the driver runs TLS on the socket itself (`mesh.hbone.tlssocket.TlsSocket`): a reader
task that feeds the core and writes its answers, writes made by whichever task produced them (a tunnel's
`send_all`), a writer task for bursts and for what the socket did not take at once, and a timer task.
Over any other stream (`trio.SSLStream` around a wrapper) it keeps a reader and a writer task around the
stream.  It hands the core's events to its tunnels (`mesh.hbone.tunnel`); the handshakes before it are in
`mesh.hbone.handshake`.  `mesh.hbone.client` opens connections and tunnels, `mesh.hbone.server` answers
them.  Only these modules and the pool touch trio; all protocol decisions are in `mesh.hbone.protocol`.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Sequence

import trio

from mesh.hbone.events import (
    ConnectionClosed,
    ConnectionDraining,
    ConnectRequested,
    DataReceived,
    Event,
    RequestRefused,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
    StreamWritable,
)
from mesh.hbone.frames import ErrorCode
from mesh.hbone.handshake import _peer_name
from mesh.hbone.protocol import HboneConnection
from mesh.hbone.state import ConnectionState
from mesh.hbone.tlssocket import RECEIVE_SIZE, Received, TlsSocket
from mesh.hbone.tunnel import Tunnel
from mesh.identity import SpiffeId

log = logging.getLogger(__name__)

CLOSE_GRACE = 2.0  # seconds to flush a final GOAWAY before the socket is closed anyway
WRITE_BURST = 100e-6  # output within this long of the last write goes out with the writer task's next write


class _Output(enum.Enum):
    """Who writes the core's output to a TlsSocket.

    DIRECT -> BURST (output within WRITE_BURST of the last write) -> DIRECT (the writer task wrote it);
    DIRECT or BURST -> BLOCKED (the socket did not take all of a write) -> DIRECT (the writer task finished
    it once the socket was writable); any -> BROKEN (a write failed, or the connection ended)."""

    DIRECT = "written by the task that produced it"
    BURST = "left to the writer task, to go out in one write with what the next tasks produce"
    BLOCKED = "the socket did not take a write: the writer task finishes it when the socket is writable"
    BROKEN = "nothing more is written"


class _Driver:
    """Moves bytes between a TLS connection and a sans-IO connection; a timer task runs keepalives.

    On a `TlsSocket` (a TCP connection): the reader task reads all that arrived into the core, and
    whatever the core produced is written at once by the task that caused it (`kick`).  The writer task
    writes only what the socket did not take (waiting for it to be writable), and the output of a burst:
    output within WRITE_BURST of the last write (many tunnels' tasks woken together, each with a little
    to send) is left to it, so that it goes out in one write after they all ran.  On another stream: a
    reader task feeds received bytes in, a writer task sends whatever the core produced."""

    def __init__(self, proto: HboneConnection, stream: trio.abc.Stream | TlsSocket, peer: SpiffeId | None) -> None:
        self.proto = proto
        self.peer = peer
        self._stream = stream
        self._tls = stream if isinstance(stream, TlsSocket) else None
        self._peer_name = _peer_name(stream) if isinstance(stream, TlsSocket | trio.SSLStream) else "peer"
        self._tunnels: dict[int, Tunnel] = {}
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._writer_done = trio.Event()
        # on a TlsSocket: who writes (what the socket did not take yet is the TlsSocket's, BLOCKED)
        self._output = _Output.DIRECT
        self._last_write = -math.inf  # when bytes were last written (time.monotonic)
        self._closing = False
        self._finished = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self.close_reason: str | None = None

    # -- what others call

    def kick(self) -> None:
        """The core may have bytes to send, or a new deadline.  On a TlsSocket the bytes are written
        now, from the calling task (in a burst, by the writer task).  Otherwise the writer is woken only
        when there are bytes: most received chunks produce none, and a needless wake-up is a task switch."""
        if self._tls is not None:
            if self._output is _Output.DIRECT and self.proto.has_output():
                now = time.monotonic()
                if now - self._last_write >= WRITE_BURST:
                    self._last_write = now
                    self._write_out()
                else:  # a burst: the writer task writes what this and the next tasks produce, at once
                    self._output = _Output.BURST
                    self._writer_lot.unpark_all()
        elif self.proto.has_output():
            self._writer_lot.unpark_all()
        scope = self._timer_scope
        if scope is not None:
            # Only ever bring the timer forward: moving a deadline re-sorts trio's timer heap, and a
            # timer that wakes too early just computes the next deadline and sleeps again.
            deadline = self._next_deadline()
            if deadline < scope.deadline:
                scope.deadline = deadline

    def release(self, tunnel: Tunnel) -> None:
        if self._tunnels.get(tunnel.stream_id) is tunnel:
            del self._tunnels[tunnel.stream_id]
            self._on_tunnel_gone()
        self.kick()

    @property
    def is_closed(self) -> bool:
        return self.proto.state is ConnectionState.CLOSED

    async def wait_closed(self) -> None:
        await self._finished.wait()

    def goaway(self) -> None:
        """Graceful shutdown: tunnels in flight finish, no new ones are taken."""
        self._dispatch(self.proto.goaway())
        self.kick()

    async def aclose(self) -> None:
        """Close now: GOAWAY, every tunnel reset."""
        self._dispatch(self.proto.close(reason="closed by this side"))
        self.kick()
        await self._finished.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes (then the transport stream is closed too)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer if self._tls is None else self._socket_writer)
                nursery.start_soon(self._timer)
                self.kick()
                task_status.started()
                if self._tls is None:
                    await self._reader()
                else:
                    await self._socket_reader(self._tls)
                await trio.sleep_forever()  # _shutdown cancels this once the last bytes are out
        finally:
            self._nursery = None
            for tunnel in list(self._tunnels.values()):
                tunnel._on_reset(self.close_reason or "connection closed")
            self._finished.set()
            if self._tls is not None:
                self._output = _Output.BROKEN
                self._tls.close()
            else:
                assert isinstance(self._stream, trio.abc.Stream)
                await trio.aclose_forcefully(self._stream)

    # -- tasks on another stream

    async def _reader(self) -> None:
        stream = self._stream
        assert isinstance(stream, trio.abc.Stream)
        while self.proto.state is not ConnectionState.CLOSED:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__ or exc
                events = self.proto.connection_lost(f"connection to {self._name()} broke: {cause}")
            else:
                if data:
                    events = self.proto.receive_data(bytes(data))
                else:
                    events = self.proto.connection_lost(f"{self._name()} closed the connection")
            self._dispatch(events)
            self.kick()

    async def _writer(self) -> None:
        stream = self._stream
        assert isinstance(stream, trio.abc.Stream)
        try:
            while True:
                data = self.proto.data_to_send()
                if data:
                    await stream.send_all(data)
                elif self._closing:
                    return
                else:
                    await self._writer_lot.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._dispatch(self.proto.connection_lost(f"sending to {self._name()} failed: {exc}"))
        finally:
            self._writer_done.set()

    # -- tasks on a TlsSocket

    async def _socket_reader(self, tls: TlsSocket) -> None:
        """Take all that arrived (one `recv` per wake-up, up to RECEIVE_SIZE decrypted: the core takes
        it in one batch), feed it to the core, write its answers (`kick`), then wait for the socket to
        be readable again."""
        sock, proto = tls.sock, self.proto
        while proto.state is not ConnectionState.CLOSED:
            lost: str | None = None
            data, state = tls.receive(RECEIVE_SIZE)
            if state is Received.BROKEN:
                lost = f"connection to {self._name()} broke: {tls.error}"
            elif state is Received.CLOSED:
                lost = f"{self._name()} closed the connection"
            if data:
                self._dispatch(proto.receive_data(data))
                self.kick()
            if tls.unsent and self._output is not _Output.BROKEN:  # TLS's own answer, not all sent
                self._blocked()
            if lost is not None and proto.state is not ConnectionState.CLOSED:
                self._dispatch(proto.connection_lost(lost))
                self.kick()
            if proto.state is ConnectionState.CLOSED:
                return
            try:
                if state is Received.MORE:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                self._dispatch(proto.connection_lost(f"connection to {self._name()} was closed"))
                return

    def _write_out(self) -> None:
        """Write what the core produced, now (the output is DIRECT or BURST)."""
        while data := self.proto.data_to_send():
            if not self._send(data):
                return

    def _send(self, data: bytes) -> bool:
        """One write; False when the socket did not take all of it (BLOCKED: the rest is the TLS
        socket's, the writer task finishes it) or failed (BROKEN)."""
        assert self._tls is not None
        try:
            if self._tls.send(data):
                return True
        except OSError as exc:  # ssl.SSLError included
            self._broken(exc)
            return False
        self._blocked()
        return False

    def _blocked(self) -> None:
        self._output = _Output.BLOCKED
        self._writer_lot.unpark_all()

    def _broken(self, exc: OSError) -> None:
        self._output = _Output.BROKEN
        self._writer_lot.unpark_all()
        self._dispatch(self.proto.connection_lost(f"sending to {self._name()} failed: {exc}"))

    async def _socket_writer(self) -> None:
        """Write what a burst produced, finish the writes the socket did not take at once; the only task
        that waits for the socket to be writable."""
        assert self._tls is not None
        tls = self._tls
        try:
            while True:
                output = self._output
                if output is _Output.BLOCKED:
                    await trio.lowlevel.wait_writable(tls.sock)
                    if self._output is _Output.BLOCKED:
                        try:
                            done = tls.flush()
                        except OSError as exc:
                            self._broken(exc)
                            return
                        if done:
                            self._output = _Output.DIRECT
                            self._write_out()
                elif output is _Output.BURST:
                    self._output = _Output.DIRECT
                    self._last_write = time.monotonic()
                    self._write_out()
                elif output is _Output.BROKEN:
                    return
                elif self._closing:
                    self._write_out()
                    if self._output is not _Output.BLOCKED:
                        return
                else:
                    await self._writer_lot.park()
        except trio.ClosedResourceError:
            self._output = _Output.BROKEN
        finally:
            self._writer_done.set()

    # -- the timer

    async def _timer(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._next_deadline()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self._dispatch(self.proto.on_timer(trio.current_time()))
            self._on_timer(trio.current_time())
            self.kick()

    def _next_deadline(self) -> float:
        deadline = self.proto.next_deadline()
        return math.inf if deadline is None else deadline

    def _on_timer(self, now: float) -> None:
        """More timers for subclasses (the client's idle close)."""

    def _on_tunnel_gone(self) -> None:
        """A tunnel left the table (subclasses track idleness)."""

    async def _shutdown(self) -> None:
        self._closing = True
        self._writer_lot.unpark_all()
        with trio.move_on_after(CLOSE_GRACE):
            await self._writer_done.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _name(self) -> str:
        return self._peer_name

    # -- events

    def _dispatch(self, events: Sequence[Event]) -> None:
        for event in events:
            self._handle(event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            tunnel = self._tunnels.get(event.stream_id)
            if tunnel is None or tunnel._closed:
                self.proto.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                tunnel._on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, StreamEnded):
            self._with_tunnel(event.stream_id, Tunnel._on_eof)
        elif isinstance(event, StreamReset):
            tunnel = self._tunnels.pop(event.stream_id, None)
            if tunnel is not None:
                tunnel._on_reset(event.reason)
                self._on_tunnel_gone()
        elif isinstance(event, StreamWritable):
            self._with_tunnel(event.stream_id, Tunnel._wake)
        elif isinstance(event, StreamAccepted | StreamRejected):
            tunnel = self._tunnels.get(event.stream_id)
            if tunnel is not None:
                tunnel._on_answer(event)
                if isinstance(event, StreamRejected):
                    del self._tunnels[event.stream_id]
                    self._on_tunnel_gone()
        elif isinstance(event, ConnectRequested):
            self._on_connect_requested(event)
        elif isinstance(event, RequestRefused):
            log.info("HBONE request from %s refused with %d: %s", self._name(), event.status, event.reason)
        elif isinstance(event, ConnectionDraining):
            log.debug("HBONE connection to %s draining (GOAWAY, by peer: %s)", self._name(), event.by_peer)
        elif isinstance(event, ConnectionClosed):
            self.close_reason = event.reason
            log.debug("HBONE connection to %s closed: %s", self._name(), event.reason)
            for tunnel in self._tunnels.values():
                tunnel._on_reset(event.reason)
            if self._nursery is not None:
                self._nursery.start_soon(self._shutdown)

    def _with_tunnel(self, stream_id: int, action: Callable[[Tunnel], None]) -> None:
        tunnel = self._tunnels.get(stream_id)
        if tunnel is not None:
            action(tunnel)

    def _on_connect_requested(self, event: ConnectRequested) -> None:
        self._dispatch(self.proto.reset(event.stream_id, ErrorCode.REFUSED_STREAM))
