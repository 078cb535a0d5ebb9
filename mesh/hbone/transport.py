"""HBONE over trio: drive the sans-IO core over a TLS stream, and hand out tunnels as trio streams.

This module holds what both sides share: the TLS handshakes with their identity checks, `Tunnel` (a
CONNECT stream as a `trio.abc.HalfCloseableStream`) and the connection driver (reader, writer and timer
tasks around the core).  `mesh.hbone.client` opens connections and tunnels, `mesh.hbone.server`
answers them.  Only these modules and the pool touch trio; all protocol decisions are in
`mesh.hbone.protocol`.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable, Collection, Sequence

import trio

from mesh.hbone.errors import (
    HandshakeError,
    TunnelReset,
)
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
from mesh.hbone.protocol import HboneConnection
from mesh.hbone.state import SENDING_STATES, TERMINAL_STREAM_STATES, ConnectionState
from mesh.identity import SpiffeId
from mesh.secrets.errors import PeerIdentityError
from mesh.secrets.tls import ALPN_H2, check_peer

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024  # bytes read from TLS at a time
SEND_CHUNK = 256 * 1024  # a tunnel's send_all hands the core this much, then waits for window if needed
CLOSE_GRACE = 2.0  # seconds to flush a final GOAWAY before the socket is closed anyway
DRAIN_ON_CLOSE = 5.0  # seconds a tunnel's aclose() waits for its queued bytes to go out


# -- handshakes ------------------------------------------------------------------------------------------


def _peer_name(stream: trio.SSLStream[trio.abc.Stream]) -> str:
    sock = getattr(stream.transport_stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _handshake(stream: trio.SSLStream[trio.abc.Stream], timeout: float,
                     slots: trio.CapacityLimiter | None = None) -> None:
    try:
        with trio.fail_after(timeout):  # waiting for a slot counts: a full listener answers late or never
            if slots is None:
                await stream.do_handshake()
            else:
                async with slots:
                    await stream.do_handshake()
    except trio.TooSlowError:
        raise HandshakeError(f"TLS handshake with {_peer_name(stream)} took over {timeout:g}s") from None
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        cause = exc.__cause__ or exc
        raise HandshakeError(
            f"TLS handshake with {_peer_name(stream)} failed ({cause}): do both sides hold certificates "
            "from the same mesh root?"
        ) from None
    if stream.selected_alpn_protocol() != ALPN_H2:
        raise HandshakeError(f"{_peer_name(stream)} did not negotiate ALPN h2: it is not an HBONE endpoint")


async def client_handshake(
    stream: trio.SSLStream[trio.abc.Stream], expected: Collection[SpiffeId], *, timeout: float = 10.0
) -> SpiffeId:
    """TLS handshake as the client; the server must present one of `expected`.  Closes `stream` on failure."""
    try:
        await _handshake(stream, timeout)
        try:
            return check_peer(stream, allowed=expected)
        except PeerIdentityError as exc:
            raise HandshakeError(
                f"HBONE server {_peer_name(stream)}: {exc}; refusing to send traffic to it"
            ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def server_handshake(
    stream: trio.SSLStream[trio.abc.Stream], trust_domain: str | None, *, timeout: float = 10.0,
    slots: trio.CapacityLimiter | None = None,
) -> SpiffeId | None:
    """TLS handshake as the server; the client must be in `trust_domain` (None: do not check).
    `slots`: the listener's handshakes in progress (waiting for one is part of `timeout`).
    Closes `stream` on failure."""
    try:
        await _handshake(stream, timeout, slots)
        if trust_domain is None:
            return None
        try:
            return check_peer(stream, trust_domain=trust_domain)
        except PeerIdentityError as exc:
            raise HandshakeError(f"HBONE client {_peer_name(stream)}: {exc}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


# -- tunnels ---------------------------------------------------------------------------------------------


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
            view = memoryview(data)
            if not view:
                self._check_can_send()
            for start in range(0, len(view), SEND_CHUNK):
                while True:
                    self._check_can_send()
                    if self._proto.can_send(self.stream_id):
                        break
                    await self._lot.park()
                chunk = bytes(view[start : start + SEND_CHUNK])
                self._proto.send_data(self.stream_id, chunk)
                self.bytes_sent += len(chunk)
                self._driver.kick()
            await trio.lowlevel.checkpoint()
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
                await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this tunnel was closed")
            if self._inbox:
                n = len(self._inbox) if max_bytes is None else min(max_bytes, len(self._inbox))
                data = bytes(self._inbox[:n])
                del self._inbox[:n]
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


# -- the connection driver ------------------------------------------------------------------------------


class _Driver:
    """Moves bytes between a transport stream and a sans-IO connection: a reader task feeds received
    bytes in, a writer task sends whatever the core produced, a timer task runs keepalives."""

    def __init__(self, proto: HboneConnection, stream: trio.abc.Stream, peer: SpiffeId | None) -> None:
        self.proto = proto
        self.peer = peer
        self._stream = stream
        self._tunnels: dict[int, Tunnel] = {}
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._writer_done = trio.Event()
        self._closing = False
        self._finished = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self.close_reason: str | None = None

    # -- what others call

    def kick(self) -> None:
        """The core may have bytes to send, or a new deadline.  The writer is woken only when there
        are bytes: most received chunks produce none, and a needless wake-up is a task switch."""
        if self.proto.has_output():
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
                nursery.start_soon(self._writer)
                nursery.start_soon(self._timer)
                self.kick()
                task_status.started()
                await self._reader()
                await trio.sleep_forever()  # _shutdown cancels this once the last bytes are out
        finally:
            self._nursery = None
            for tunnel in list(self._tunnels.values()):
                tunnel._on_reset(self.close_reason or "connection closed")
            self._finished.set()
            await trio.aclose_forcefully(self._stream)

    # -- tasks

    async def _reader(self) -> None:
        while self.proto.state is not ConnectionState.CLOSED:
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
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
        try:
            while True:
                data = self.proto.data_to_send()
                if data:
                    await self._stream.send_all(data)
                elif self._closing:
                    return
                else:
                    await self._writer_lot.park()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._dispatch(self.proto.connection_lost(f"sending to {self._name()} failed: {exc}"))
        finally:
            self._writer_done.set()

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
        if isinstance(self._stream, trio.SSLStream):
            return _peer_name(self._stream)
        return "peer"

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
