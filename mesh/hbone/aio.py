"""HBONE on the engine (asyncio Protocols on uvloop): the sans-IO core driven from the TLS transport's
callbacks, and each tunnel an end that a `Splice` joins to a TCP connection.

TLS is uvloop's (OpenSSL over memory buffers, in C): one read of up to 256 KiB per wake-up, records
decrypted in one go, and a write encrypts and sends at once.  Received bytes go into the core and the
events out of it are carried out before the callback returns: a DATA payload is written to the TCP end
from there; what the core has to send is written once per callback (`flush`).

    conn = await dial(loop, sock, ctx, expected={server_id}, config=config)   # client (mesh.hbone.aiopool)
    end = await conn.open_tunnel("10.244.1.5:8080", headers)
    result = await Splice(plain_end, end, counter).done

    await serve_tls(transport, ctx, handler, trust_domain=..., gate=gate)      # server, per connection
    # handler(request, acceptor): acceptor.accept() -> TunnelEnd, or acceptor.reject(status, reason)

The bounds are the core's and the listener's, as on the trio transport: the frame guard, the reset
budget, the control-frame bound, the answer timeout, the per-listener caps.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import (
    ConnectionNotUsableError,
    HandshakeError,
    HboneError,
    ListenerFull,
    ProtocolUsageError,
    TunnelRejected,
    TunnelReset,
    TunnelTimeout,
)
from mesh.hbone.events import (
    ConnectionClosed,
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
from mesh.hbone.headers import Header
from mesh.hbone.protocol import HboneConnection
from mesh.hbone.server import InboundRequest, ListenerGate
from mesh.hbone.sides import HboneClient, HboneServer
from mesh.hbone.splice import Splice
from mesh.hbone.state import SENDING_STATES
from mesh.identity import SpiffeId
from mesh.secrets.errors import PeerIdentityError
from mesh.secrets.tls import ALPN_H2, check_peer

log = logging.getLogger(__name__)

DRAIN_ON_CLOSE = 5.0  # seconds a finished tunnel's queued bytes may wait for window before a reset
_TIMED_OUT = object()
_REFUSED = object()  # the server reset the CONNECT unprocessed (REFUSED_STREAM): safe to send elsewhere


class SendsAhead(Protocol):
    """A client end that writes its bytes to a tunnel before the tunnel is answered (`PlainEnd`)."""

    def send_ahead(self, end: TunnelEnd | None) -> None: ...


class TunnelEnd:
    """One HBONE stream as an end of a `Splice`.  Data that arrives before it is joined is kept (the
    stream's window bounds it: nothing is acknowledged until then)."""

    __slots__ = ("conn", "stream_id", "authority", "writable", "_splice", "_side", "_early", "_eof", "error",
                 "answer", "_hold", "_held", "closed", "_drain_timer")

    def __init__(self, conn: AioHbone, stream_id: int, authority: str) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.authority = authority
        self.writable = True
        self._splice: Splice | None = None
        self._side = 0
        self._early: list[tuple[bytes | memoryview, int]] = []
        self._eof = False
        self.error: str | None = None
        self.answer: asyncio.Future[object] | None = None
        self._hold = False  # the other end is full: acknowledge nothing (the peer's window closes)
        self._held = 0
        self.closed = False
        self._drain_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<TunnelEnd {self.authority} stream {self.stream_id}>"

    # -- what the connection tells it ------------------------------------------------------------------

    def on_data(self, data: bytes | memoryview, length: int) -> None:
        splice = self._splice
        if splice is None:
            self._early.append((data, length))
            return
        splice.data(self._side, data)
        if self._hold:
            self._held += length
        else:
            self.conn.proto.acknowledge(self.stream_id, length)

    def on_eof(self) -> None:
        if self._splice is not None:
            self._splice.ended(self._side)
        else:
            self._eof = True

    def on_reset(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(None)
        if self._splice is not None:
            self._splice.failed(self._side, f"tunnel to {self.authority}: {reason}")

    def on_writable(self) -> None:
        if not self.writable and self.conn.writable:
            self.writable = True
            if self._splice is not None:
                self._splice.drained(self._side)

    # -- End (what the splice calls) --------------------------------------------------------------------

    def attach(self, splice: Splice, side: int) -> None:
        self._splice, self._side = splice, side
        early, self._early = self._early, []
        for data, length in early:
            self.on_data(data, length)
        if self._eof:
            splice.ended(side)
        elif self.error is not None:
            splice.failed(side, f"tunnel to {self.authority}: {self.error}")
        self.conn.flush()

    def detach(self) -> None:
        """Leave the splice: what arrives is kept again until the next `attach` (the window bounds it)."""
        self._splice = None
        self.resume_reading()

    def write(self, data: bytes | memoryview) -> None:
        conn = self.conn
        try:
            more = conn.proto.send_data(self.stream_id, data)
        except HboneError:  # reset meanwhile: its event says so
            return
        if len(data) >= WRITE_AT_ONCE:  # bulk: sent as it comes, so that reading and sending overlap
            conn.flush_now()
        else:
            conn.flush()
        if not more or not conn.writable:
            self.writable = False
            conn.blocked.add(self)

    def write_eof(self) -> None:
        conn = self.conn
        if conn.proto.stream_state(self.stream_id) in SENDING_STATES:
            conn.dispatch(conn.proto.end_stream(self.stream_id))
            conn.flush()

    def pause_reading(self) -> None:
        self._hold = True

    def resume_reading(self) -> None:
        self._hold = False
        if self._held:
            held, self._held = self._held, 0
            self.conn.proto.acknowledge(self.stream_id, held)
            self.conn.flush()

    def close(self) -> None:
        """Both directions are done: the stream is finished (its queued bytes still go out)."""
        if self.closed:
            return
        self.closed = True
        conn = self.conn
        if conn.proto.buffered(self.stream_id):
            self._drain_timer = conn.loop.call_later(DRAIN_ON_CLOSE, self._give_up)
        else:
            conn.dispatch(conn.proto.reset(self.stream_id, ErrorCode.CANCEL))  # a no-op once both ended
        conn.release(self)

    def drop_early(self) -> None:
        """The stream is gone before it was joined: what it kept (early data, which nothing will read)
        is given back to the connection's window."""
        if self._early:
            held = sum(length for _, length in self._early)
            self._early = []
            self.conn.proto.acknowledge(self.stream_id, held)

    def _give_up(self) -> None:
        self.conn.dispatch(self.conn.proto.reset(self.stream_id, ErrorCode.CANCEL))
        self.conn.flush()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        conn = self.conn
        conn.dispatch(conn.proto.reset(self.stream_id, ErrorCode.CANCEL))
        conn.release(self)


# A tunnel's write at least this large is sent at once rather than at the end of the turn (`flush`): it
# fills TLS records of its own, and a bulk stream whose reads were all held for the turn's one send went
# out in bursts of up to its window (4 MiB), reading and encrypting while nothing was sent (one stream
# 20-30 % slower in the bench cluster).
WRITE_AT_ONCE = 16 * 1024
READ_BUFFER = 256 * 1024  # what one TLS read may decrypt into (uvloop's own read size)
_reads = threading.local()


def read_buffer() -> memoryview:
    """The calling thread's buffer for the TLS reads of every HBONE connection on its loop.

    uvloop reads TLS for a plain `Protocol` with `SSLObject.read(256 KiB)`: each read allocates 256 KiB
    and shrinks it to what was read, which glibc may serve with `mmap` (above its mmap threshold, 128
    KiB until the process frees a larger mapped block whole): an `mmap`, an `mremap`, a `munmap` and
    fresh zeroed pages per read, ~17 us against ~1.5 us.  A `BufferedProtocol` is handed this buffer
    instead, and what was read is copied out of it at once (so no view of it outlives the callback)."""
    buf: memoryview | None = getattr(_reads, "buffer", None)
    if buf is None:
        buf = _reads.buffer = memoryview(bytearray(READ_BUFFER))
    return buf


class AioHbone(asyncio.BufferedProtocol):
    """An HBONE connection on the engine: the TLS transport's callbacks drive the core.  Nothing is read
    or sent before `start()` (the caller checks the peer's identity first).  Reads land in the thread's
    `read_buffer()` (`get_buffer`/`buffer_updated`); a transport that hands over bytes whole calls
    `data_received`."""

    def __init__(self, proto: HboneConnection, loop: asyncio.AbstractEventLoop) -> None:
        self.proto = proto
        self.loop = loop
        self.peer: SpiffeId | None = None
        self.peer_address = "?"
        self.transport: asyncio.Transport | None = None
        self.ends: dict[int, TunnelEnd] = {}
        self.blocked: set[TunnelEnd] = set()  # ends told to wait for the transport or the window
        self.writable = True
        self.started = False
        self._pending: list[bytes] = []
        self._read_into = memoryview(b"")  # what `get_buffer` hands the transport: the thread's buffer
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Handle | None = None  # the send at the end of this turn (`flush`)
        self.close_reason: str | None = None
        self.finished: asyncio.Future[None] = loop.create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._read_into = read_buffer()  # (called on the loop's thread: the buffer is that thread's)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_address = f"{peer[0]}:{peer[1]}"

    def start(self, peer: SpiffeId | None) -> None:
        self.peer = peer
        self.started = True
        self._arm_timer()
        pending, self._pending = self._pending, []
        for data in pending:
            self.data_received(data)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_into  # uvloop fills it, then calls buffer_updated at once

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_into[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self._pending.append(data)
            return
        self.dispatch(self.proto.receive_data(data))
        self.flush()

    def eof_received(self) -> bool:
        self._lost(f"{self.peer_address} closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection to {self.peer_address} broke: {exc}" if exc else "connection closed")
        if self._timer is not None:
            self._timer.cancel()
        if not self.finished.done():
            self.finished.set_result(None)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        blocked, self.blocked = self.blocked, set()
        for end in blocked:
            if self.proto.can_send(end.stream_id):
                end.on_writable()
            else:
                self.blocked.add(end)

    # -- driving the core ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send what the core has produced, at the end of this turn of the loop: the frames every callback
        of the turn produced for this connection go out in one TLS write (a CONNECT's answer and the first
        bytes from the application, a stream's last DATA and its END_STREAM, the streams of many tunnels),
        each write being a TLS record and a system call.  Nothing is scheduled while the core has nothing
        to send (most reads produce no answer); whoever gives it frames later calls this again."""
        if self._flushing is None and self.started and self.proto.has_output():
            self._flushing = self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Send what the core has produced now (a bulk write; a final GOAWAY before the transport closes)."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if not self.started:
            return
        data = self.proto.data_to_send()
        if data:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def _lost(self, reason: str) -> None:
        if self.close_reason is None:
            self.dispatch(self.proto.connection_lost(reason))

    def dispatch(self, events: Sequence[Event]) -> None:
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                end = self.ends.get(event.stream_id)  # type: ignore[union-attr]
                if end is None:
                    self.proto.acknowledge(event.stream_id, event.flow_controlled_length)  # type: ignore[union-attr]
                else:
                    end.on_data(event.data, event.flow_controlled_length)  # type: ignore[union-attr]
            else:
                self._handle(event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, StreamEnded):
            end = self.ends.get(event.stream_id)
            if end is not None:
                end.on_eof()
        elif isinstance(event, StreamReset):
            end = self.ends.pop(event.stream_id, None)
            if end is not None:
                self.blocked.discard(end)
                end.drop_early()
                if event.error_code == ErrorCode.REFUSED_STREAM and end.answer is not None and not end.answer.done():
                    end.answer.set_result(_REFUSED)  # a server draining after GOAWAY (RFC 9113, 8.7)
                end.on_reset(event.reason)
                self._tunnel_gone()
        elif isinstance(event, StreamWritable):
            end = self.ends.get(event.stream_id)
            if end is not None and self.writable:
                self.blocked.discard(end)
                end.on_writable()
        elif isinstance(event, StreamAccepted | StreamRejected):
            end = self.ends.get(event.stream_id)
            if end is not None and end.answer is not None and not end.answer.done():
                end.answer.set_result(event)
            if isinstance(event, StreamRejected):
                self.ends.pop(event.stream_id, None)
                self._tunnel_gone()
        elif isinstance(event, ConnectRequested):
            self._on_connect(event)
        elif isinstance(event, RequestRefused):
            log.info("HBONE request from %s refused with %d: %s", self.peer_address, event.status, event.reason)
        elif isinstance(event, ConnectionClosed):
            self.close_reason = event.reason
            log.debug("HBONE connection to %s closed: %s", self.peer_address, event.reason)
            ends, self.ends = self.ends, {}
            for end in ends.values():
                end.on_reset(event.reason)
            self._on_closed()
            self.flush_now()  # a final GOAWAY
            if self.transport is not None:
                self.transport.close()

    def release(self, end: TunnelEnd) -> None:
        end.drop_early()
        if self.ends.get(end.stream_id) is end:
            del self.ends[end.stream_id]
            self.blocked.discard(end)
            self._tunnel_gone()
        self.flush()

    def goaway(self) -> None:
        """Graceful shutdown: tunnels in flight finish, no new ones are taken."""
        self.dispatch(self.proto.goaway())
        self.flush()

    def close(self) -> None:
        """Close now: GOAWAY, every tunnel reset."""
        self.dispatch(self.proto.close(reason="closed by this side"))
        self.flush()

    @property
    def is_closed(self) -> bool:
        return self.close_reason is not None or self.finished.done()

    # -- time ------------------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        deadline = self._next_deadline()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _next_deadline(self) -> float | None:
        return self.proto.next_deadline()

    def _on_timer(self) -> None:
        self._timer = None
        if self.is_closed:
            return
        self.dispatch(self.proto.on_timer(self.loop.time()))
        self._on_tick(self.loop.time())
        self.flush()
        if not self.is_closed:
            self._arm_timer()

    # -- for the sides ---------------------------------------------------------------------------------

    def _on_tick(self, now: float) -> None:
        """More timers for subclasses (the client's idle close)."""

    def _tunnel_gone(self) -> None:
        """A tunnel left the table."""

    def _on_connect(self, event: ConnectRequested) -> None:
        self.dispatch(self.proto.reset(event.stream_id, ErrorCode.REFUSED_STREAM))

    def _on_closed(self) -> None:
        """The connection is finished (subclasses cancel what waits on it)."""


class AioClientConnection(AioHbone):
    """The side that opens tunnels; with `idle_timeout`, it closes itself (GOAWAY) after that long
    without tunnels."""

    proto: HboneClient

    def __init__(self, loop: asyncio.AbstractEventLoop, config: HboneConfig | None = None,
                 idle_timeout: float | None = None) -> None:
        super().__init__(HboneClient(config, now=loop.time()), loop)
        self.idle_timeout = idle_timeout
        self._idle_since: float | None = loop.time()

    @property
    def active_tunnels(self) -> int:
        return self.proto.active_streams

    def can_open_tunnel(self) -> bool:
        return self.started and not self.is_closed and self.proto.can_open_stream()

    async def open_tunnel(self, authority: str, headers: Sequence[Header] = (),
                          ahead: SendsAhead | None = None) -> TunnelEnd:
        """CONNECT to `authority`; the tunnel once the server answered 2xx.  Raises as the trio client
        does: `TunnelRejected`, `TunnelReset`, `TunnelTimeout`, `ConnectionNotUsableError`.

        `ahead`: the client end whose bytes go out as early data, with the HEADERS and as they come
        until the answer (`PlainEnd.send_ahead`), saving the first request a round trip; it keeps them
        until it is joined, so a CONNECT refused unprocessed can be opened elsewhere with them again."""
        if not self.started or self.is_closed:
            raise ConnectionNotUsableError("the HBONE connection is not running (or already closed)")
        stream_id = self.proto.open_stream(authority, headers)
        end = TunnelEnd(self, stream_id, authority)
        answer = end.answer = self.loop.create_future()
        self.ends[stream_id] = end
        self._idle_since = None
        if ahead is not None:
            ahead.send_ahead(end)
        self.flush()
        timeout = self.proto.config.answer_timeout
        timer = self.loop.call_later(timeout, _expire, answer)
        try:
            result = await answer
        except BaseException:
            end.abort()
            raise
        finally:
            timer.cancel()
            if ahead is not None:
                ahead.send_ahead(None)
        if result is _TIMED_OUT:
            end.abort()
            raise TunnelTimeout(
                f"CONNECT {authority} got no answer from {self.peer_address} within {timeout:g}s: is the "
                "destination (its node agent, or the application behind it) overloaded?")
        if isinstance(result, StreamRejected):
            raise TunnelRejected(authority, result.status, result.reason)
        if result is _REFUSED:  # the pool opens it on another connection
            raise ConnectionNotUsableError(f"{self.peer_address} refused CONNECT {authority} unprocessed: {end.error}")
        if result is None:
            self.release(end)
            raise TunnelReset(f"CONNECT {authority} failed before an answer: {end.error}")
        return end

    def _tunnel_gone(self) -> None:
        if not self.ends and self.proto.active_streams == 0:
            self._idle_since = self.loop.time()

    def _next_deadline(self) -> float | None:
        deadline = self.proto.next_deadline()
        if deadline is not None and self.idle_timeout is not None and self._idle_since is not None:
            deadline = min(deadline, self._idle_since + self.idle_timeout)
        return deadline

    def _on_tick(self, now: float) -> None:
        if self.idle_timeout is None or self._idle_since is None:
            return
        if self.proto.active_streams == 0 and now >= self._idle_since + self.idle_timeout:
            self._idle_since = None
            self.dispatch(self.proto.goaway())


def _expire(answer: asyncio.Future[object]) -> None:
    if not answer.done():
        answer.set_result(_TIMED_OUT)


class AioAcceptor:
    """The handler's answer to one CONNECT: `accept()` (200) once the upstream is connected, or
    `reject(status, reason)`."""

    __slots__ = ("_conn", "end", "decided")

    def __init__(self, conn: AioServerConnection, end: TunnelEnd) -> None:
        self._conn = conn
        self.end = end
        self.decided = False

    def accept(self) -> TunnelEnd:
        self._decide()
        self._conn.proto.accept(self.end.stream_id)
        self._conn.flush()
        return self.end

    def reject(self, status: int, reason: str = "") -> None:
        self._decide()
        self._conn.dispatch(self._conn.proto.reject(self.end.stream_id, status, reason))
        self._conn.release(self.end)

    def _decide(self) -> None:
        if self.decided:
            raise ProtocolUsageError("this CONNECT was already answered")
        if self.end.error is not None:
            raise TunnelReset(f"CONNECT {self.end.authority} was cancelled by the client: {self.end.error}")
        self.decided = True
        self._conn.answered(self.end.stream_id)


AioHandler = Callable[[InboundRequest, AioAcceptor], Awaitable[None]]


class AioServerConnection(AioHbone):
    """The side that takes tunnels: `handler` runs in a task of its own for each well-formed CONNECT; a
    CONNECT the client resets before its answer cancels that task."""

    proto: HboneServer

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: AioHandler,
                 config: HboneConfig | None = None) -> None:
        super().__init__(HboneServer(config, now=loop.time()), loop)
        self._handler = handler
        self._unanswered: dict[int, asyncio.Task[None]] = {}
        self.peer_hash = ""  # SHA-256 of the client's leaf certificate (DER), hex (`serve_tls` sets it)

    def answered(self, stream_id: int) -> None:
        self._unanswered.pop(stream_id, None)

    def _handle(self, event: Event) -> None:
        if isinstance(event, StreamReset):
            task = self._unanswered.pop(event.stream_id, None)
            if task is not None:  # the client gave up: stop connecting upstream for it
                task.cancel()
        super()._handle(event)

    def _on_closed(self) -> None:
        unanswered, self._unanswered = self._unanswered, {}
        for task in unanswered.values():
            task.cancel()

    def _on_connect(self, event: ConnectRequested) -> None:
        request = event.request
        end = TunnelEnd(self, event.stream_id, str(request.authority))
        self.ends[event.stream_id] = end
        info = InboundRequest(stream_id=event.stream_id, authority=request.authority, headers=request.headers,
                              peer=self.peer, peer_address=self.peer_address, forwarded_for=request.forwarded_for,
                              forwarded_host=request.forwarded_host, peer_certificate_hash=self.peer_hash)
        acceptor = AioAcceptor(self, end)
        self._unanswered[event.stream_id] = self.loop.create_task(self._run(info, acceptor))

    async def _run(self, info: InboundRequest, acceptor: AioAcceptor) -> None:
        try:
            await self._handler(info, acceptor)
        except asyncio.CancelledError:
            log.debug("HBONE CONNECT %s from %s: reset by the client before its answer", info.authority, info.peer)
        except (HboneError, OSError) as exc:
            log.info("HBONE tunnel to %s from %s ended: %s", info.authority, info.peer, exc)
            self._answer_if_undecided(acceptor, 503, f"upstream failed: {exc}")
        except Exception:
            log.exception("HBONE handler failed for CONNECT %s from %s", info.authority, info.peer)
            self._answer_if_undecided(acceptor, 503, "internal error in the HBONE server")
        else:
            self._answer_if_undecided(acceptor, 503, "the server did not answer this CONNECT")
        finally:
            self._unanswered.pop(info.stream_id, None)
            if not acceptor.end.closed and acceptor.end._splice is None:
                acceptor.end.abort()

    def _answer_if_undecided(self, acceptor: AioAcceptor, status: int, reason: str) -> None:
        if acceptor.decided or acceptor.end.error is not None:
            return
        acceptor.decided = True
        try:
            self.dispatch(self.proto.reject(acceptor.end.stream_id, status, reason))
        except HboneError:
            return
        self.flush()


# -- TLS ---------------------------------------------------------------------------------------------------


def _verify(transport: asyncio.BaseTransport, who: str, *, allowed: Collection[SpiffeId] | None = None,
            trust_domain: str | None = None) -> SpiffeId | None:
    tls = transport.get_extra_info("ssl_object")
    if tls is None or tls.selected_alpn_protocol() != ALPN_H2:
        raise HandshakeError(f"{who} did not negotiate ALPN h2: it is not an HBONE endpoint")
    if allowed is None and trust_domain is None:
        return None
    try:
        return check_peer(tls, allowed=allowed, trust_domain=trust_domain)
    except PeerIdentityError as exc:
        raise HandshakeError(f"{who}: {exc}") from None


async def dial(loop: asyncio.AbstractEventLoop, sock: socket.socket, ctx: ssl.SSLContext, *,
               expected: Collection[SpiffeId], where: str, config: HboneConfig | None = None,
               idle_timeout: float | None = None, timeout: float = 10.0) -> AioClientConnection:
    """TLS as the client over the connected socket `sock`; the server must be one of `expected`.
    The socket is closed on failure."""
    conn = AioClientConnection(loop, config, idle_timeout)
    try:
        transport, _ = await loop.create_connection(lambda: conn, sock=sock, ssl=ctx, server_hostname="",
                                                    ssl_handshake_timeout=timeout)
    except (TimeoutError, ssl.SSLError, OSError) as exc:
        sock.close()
        what = "took too long" if isinstance(exc, asyncio.TimeoutError) else f"failed ({exc})"
        raise HandshakeError(f"TLS handshake with {where} {what}: do both sides hold certificates "
                             "from the same mesh root?") from None
    try:
        peer = _verify(transport, f"HBONE server {where}", allowed=expected)
    except HandshakeError as exc:
        transport.abort()
        raise HandshakeError(f"{exc}; refusing to send traffic to it") from None
    conn.start(peer)
    return conn


def accept_all(listener: socket.socket, take: Callable[[socket.socket], None]) -> None:
    """Accept every connection waiting on the non-blocking `listener` (the work of its readiness callback,
    `loop.add_reader(listener.fileno(), accept_all, listener, take)`): each made non-blocking, with
    TCP_NODELAY, and handed to `take`.  An error other than "none left" (EMFILE, say) is logged; the next
    readiness tries again."""
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("accept on %s failed: %s", listener.getsockname(), exc)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        take(sock)


async def serve_tls(sock: socket.socket, ctx: ssl.SSLContext, handler: AioHandler, *,
                    trust_domain: str | None, gate: ListenerGate | None = None,
                    config: HboneConfig | None = None, timeout: float = 10.0) -> AioServerConnection:
    """The server's side of one accepted TCP connection (a socket nothing has read from): the
    listener's caps, the TLS handshake (the client must be of `trust_domain`), then the HBONE connection,
    started.  Raises `ListenerFull` or `HandshakeError`, the socket closed."""
    loop = asyncio.get_running_loop()
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        host, port = "?", 0
    who = f"HBONE client {host}:{port}"
    if gate is not None and not gate.enter():
        sock.close()
        raise ListenerFull(f"refused a connection from {host}:{port}: {gate.limits.max_connections} "
                           "connections are open on this HBONE listener, its cap")
    conn = AioServerConnection(loop, handler, config)
    try:
        deadline = loop.time() + timeout
        slots = _slots(gate) if gate is not None else None
        try:
            if slots is not None:  # waiting for a slot counts: a full listener answers late or never
                await asyncio.wait_for(slots.acquire(), timeout)
            try:
                tls, _ = await loop.connect_accepted_socket(
                    lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=max(deadline - loop.time(), 0.001))
            finally:
                if slots is not None:
                    slots.release()
        except TimeoutError:
            sock.close()
            raise HandshakeError(f"TLS handshake with {who} took over {timeout:g}s") from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise HandshakeError(f"TLS handshake with {who} failed ({exc}): do both sides hold certificates "
                                 "from the same mesh root?") from None
        try:
            identity = _verify(tls, who, trust_domain=trust_domain)
        except HandshakeError:
            tls.abort()
            raise
        conn.peer_address = f"{host}:{port}"
        der = tls.get_extra_info("ssl_object").getpeercert(binary_form=True)
        conn.peer_hash = hashlib.sha256(der).hexdigest() if der else ""
        conn.start(identity)
    except BaseException:
        if gate is not None:
            gate.leave()
        raise
    if gate is not None:
        conn.finished.add_done_callback(lambda _: gate.leave())
    return conn


def _slots(gate: ListenerGate) -> asyncio.Semaphore:
    """The engine's count of the listener's handshakes in progress (made on first use, on the engine)."""
    slots = gate.engine_handshakes
    if slots is None:
        slots = gate.engine_handshakes = asyncio.Semaphore(gate.limits.max_handshakes)
    return slots  # type: ignore[no-any-return]
