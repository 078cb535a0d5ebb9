"""HTTP/2 toward endpoints: one connection carries many requests at once (streams), as gRPC expects.

`Http2Connection` is one multiplexed connection.  `open_stream()` hands out an `Http2Stream`, the
`UpstreamConnection` of one request; the pool (`waypoint.upstream.pool`) asks `has_capacity` first, so no
more streams are open than the peer's SETTINGS_MAX_CONCURRENT_STREAMS (and never more than
`MAX_STREAMS_PER_CONNECTION`); the connection waits for the peer's SETTINGS before it is used.

There is no reader task: whichever stream needs something from the peer (its response head, body, or
send window) takes the read lock, reads once and hands every event to the stream it belongs to, then
checks again (the way httpcore multiplexes).  Everything a stream receives is kept until its request
reads it, bounded by flow control.

Flow control: a stream's received data is acknowledged as its reader consumes it (the stream window,
`STREAM_WINDOW`, bounds what one slow reader can hold); the connection window (`CONNECTION_WINDOW`) is
as large as all the streams' windows together, so one stalled stream never stalls the others.  Sending
waits for the peer's stream and connection windows.

A stream reset (by the peer, or by `aclose()` before the exchange is over: RST_STREAM CANCEL) ends only
that request.  GOAWAY stops new streams on the connection while the streams it processes finish
(`GoawaySplitter`); those it did not process (ids above its last stream id) fail with `NotProcessed`,
which the forwarder sends again on another connection.  Trailers
pass both ways: `end_request(trailers)` sends request trailers, `response_trailers` holds the response's.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from waypoint.errors import RefusedStream, UpstreamError, UpstreamReset
from waypoint.http.http2 import READ_SIZE, _text
from waypoint.l7.model import Headers, RequestHead, ResponseHead, forwardable, header_values

MAX_STREAMS_PER_CONNECTION = 100  # as the HBONE pool: a new connection once this many requests are open
STREAM_WINDOW = 65535  # the protocol's initial stream window
CONNECTION_WINDOW = MAX_STREAMS_PER_CONNECTION * STREAM_WINDOW
FLUSH_TIMEOUT = 10.0  # a peer that reads nothing for this long is gone


class NotProcessed(RefusedStream):
    """The endpoint sent GOAWAY without processing this stream: safe to send again elsewhere."""


class ConnState(enum.Enum):
    OPEN = "open"  # takes new streams
    DRAINING = "draining"  # GOAWAY received: streams it processes finish, no new ones
    CLOSED = "closed"  # the connection is gone


class StreamPhase(enum.Enum):
    RESERVED = "reserved"  # a slot, no HEADERS sent yet
    OPEN = "open"  # HEADERS sent
    DONE = "done"  # request sent and response complete
    FAILED = "failed"  # reset, refused or the connection is gone
    CLOSED = "closed"  # given back to the connection


@dataclass
class _StreamState:
    """What the connection learned for one stream, waiting for its request to read it."""

    stream_id: int = 0
    phase: StreamPhase = StreamPhase.RESERVED
    head: ResponseHead | None = None
    data: deque[bytes] = field(default_factory=deque)
    trailers: Headers = ()
    response_ended: bool = False
    request_ended: bool = False
    error: UpstreamError | None = None


@dataclass(frozen=True)
class Goaway:
    last_stream_id: int
    error_code: int


class GoawaySplitter:
    """Takes GOAWAY frames out of the bytes the peer sends, in order, before h2 sees them.

    h2 ends the whole connection on GOAWAY, while the protocol lets the streams up to its last stream id
    finish (a graceful shutdown, as gRPC servers and Envoy do it).  So GOAWAY is handled here and h2 sees
    every other frame; frames are passed on whole."""

    GOAWAY = 0x7

    def __init__(self, max_frame: int = 16384) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame  # a longer frame is refused (ValueError) before it is buffered

    def feed(self, data: bytes) -> list[bytes | Goaway]:
        self._buf += data
        out: list[bytes | Goaway] = []
        pos, start = 0, 0
        while len(self._buf) - pos >= 9:
            length = int.from_bytes(self._buf[pos:pos + 3], "big")
            if length > self._max_frame:
                raise ValueError(f"a frame of {length} bytes is over the {self._max_frame} allowed")
            end = pos + 9 + length
            if len(self._buf) < end:
                break
            if self._buf[pos + 3] == self.GOAWAY and length >= 8:
                if pos > start:
                    out.append(bytes(self._buf[start:pos]))
                last = int.from_bytes(self._buf[pos + 9:pos + 13], "big") & 0x7FFFFFFF
                out.append(Goaway(last, int.from_bytes(self._buf[pos + 13:pos + 17], "big")))
                start = end
            pos = end
        if pos > start:
            out.append(bytes(self._buf[start:pos]))
        del self._buf[:pos]
        return out


def _headers(pairs: list[tuple[bytes, bytes]] | list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    return [(_text(k).lower(), _text(v)) for k, v in pairs or []]


class Http2Connection:
    def __init__(self, stream: trio.abc.Stream, max_header_bytes: int = 60 * 1024,
                 max_streams: int = MAX_STREAMS_PER_CONNECTION,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.stream = stream
        self._clock = clock
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.max_streams = max_streams
        self.state = ConnState.OPEN
        self.reserved = 0  # streams handed out and not given back
        self.idle_since = clock()  # when the last stream was given back
        self._frames = GoawaySplitter(self.conn.max_inbound_frame_size)
        self._failure = ""  # why the connection ended
        self._settled = False  # the peer's SETTINGS arrived
        self._streams: dict[int, _StreamState] = {}
        self._read_lock = trio.Lock()
        self._send_lock = trio.Lock()

    # ---- the connection ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Send the preface and wait for the peer's SETTINGS (its stream limit); the caller bounds the wait."""
        await self.flush()
        await self._until(lambda: self._settled)
        if not self._settled:
            raise UpstreamReset(f"no HTTP/2 SETTINGS from the endpoint ({self._failure or 'connection closed'}): "
                                "does it speak HTTP/2 (prior knowledge) on this port?")

    @property
    def capacity(self) -> int:
        return min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)

    @property
    def has_capacity(self) -> bool:
        return self.state is ConnState.OPEN and self.reserved < self.capacity

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def open_stream(self) -> Http2Stream:
        """A slot for one request (the caller checked `has_capacity`)."""
        self.reserved += 1
        return Http2Stream(self)

    async def flush(self) -> None:
        """Send what h2 has queued.  Shielded: a write cut short by one request's timeout would corrupt the
        framing for every other stream; a peer that takes no bytes for `FLUSH_TIMEOUT` loses the connection."""
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                data = self.conn.data_to_send()
                if not data or self.state is ConnState.CLOSED:
                    return
                try:
                    with trio.fail_after(FLUSH_TIMEOUT):
                        await self.stream.send_all(data)
                except trio.TooSlowError:
                    self._fail_all(UpstreamReset(f"endpoint took no data for {FLUSH_TIMEOUT:g}s"))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._fail_all(UpstreamReset(f"connection to endpoint reset while sending: {exc}"))

    async def aclose(self) -> None:
        self._fail_all(UpstreamReset("connection to endpoint closed"))
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await self.stream.aclose()

    # ---- reading: whoever waits reads ----------------------------------------------------------------

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Read and dispatch until `ready()` (or the connection is gone)."""
        while not ready() and self.state is not ConnState.CLOSED:
            async with self._read_lock:
                if ready() or self.state is ConnState.CLOSED:
                    return
                await self._read_once()

    async def _read_once(self) -> None:
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail_all(UpstreamReset(f"connection to endpoint reset: {exc}"))
            return
        if not data:
            self._fail_all(UpstreamReset("endpoint closed the connection"))
            return
        try:
            parts = self._frames.feed(bytes(data))
        except ValueError as exc:
            self._fail_all(UpstreamReset(f"endpoint broke the HTTP/2 protocol: {exc}"))
            return
        for part in parts:
            if isinstance(part, Goaway):
                self._goaway(part)
                continue
            try:
                events = self.conn.receive_data(part)
            except h2.exceptions.ProtocolError as exc:
                self._fail_all(UpstreamReset(f"endpoint broke the HTTP/2 protocol: {exc}"))
                return
            for event in events:
                self._dispatch(event)
        await self.flush()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._settled = True
            return
        if isinstance(event, h2.events.ConnectionTerminated):  # h2's own, for a protocol error of ours
            self._fail_all(UpstreamReset(f"HTTP/2 connection to endpoint ended ({_code(event.error_code)})"))
            return
        sid = getattr(event, "stream_id", None)
        s = self._streams.get(sid) if sid else None
        if s is None:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if isinstance(event, h2.events.ResponseReceived):
            pairs = _headers(event.headers)
            status = int(next((v for k, v in pairs if k == ":status"), "502"))
            s.head = ResponseHead(status, tuple(p for p in pairs if not p[0].startswith(":")))
        elif isinstance(event, h2.events.DataReceived):
            data = bytes(event.data or b"")
            if data:
                s.data.append(data)
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding > 0:
                self.conn.acknowledge_received_data(padding, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            s.trailers = tuple(_headers(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            s.response_ended = True
            if s.request_ended:
                s.phase = StreamPhase.DONE
        elif isinstance(event, h2.events.StreamReset):
            if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                self._fail(s, RefusedStream("endpoint refused the stream (REFUSED_STREAM)"))
            elif not (s.response_ended and event.error_code == h2.errors.ErrorCodes.NO_ERROR):
                self._fail(s, UpstreamReset(f"endpoint reset the stream ({_code(event.error_code)})", "UR"))
            else:  # answered in full, the rest of the request is not wanted: the exchange is over
                s.request_ended = True
                s.phase = StreamPhase.DONE

    def _goaway(self, goaway: Goaway) -> None:
        if self.state is ConnState.OPEN:
            self.state = ConnState.DRAINING
        for sid, s in self._streams.items():
            if sid > goaway.last_stream_id:
                self._fail(s, NotProcessed(f"endpoint sent GOAWAY ({_code(goaway.error_code)}) before "
                                           "processing the request"))
        if goaway.error_code != h2.errors.ErrorCodes.NO_ERROR:
            self._fail_all(UpstreamReset(f"endpoint closed the connection with GOAWAY ({_code(goaway.error_code)})"))

    def _fail(self, s: _StreamState, error: UpstreamError) -> None:
        if s.phase in (StreamPhase.OPEN, StreamPhase.RESERVED):
            s.phase = StreamPhase.FAILED
            s.error = error

    def _fail_all(self, error: UpstreamError) -> None:
        self._failure = self._failure or str(error)
        self.state = ConnState.CLOSED
        for s in self._streams.values():
            self._fail(s, error)

    # ---- one stream ----------------------------------------------------------------------------------

    async def _send_head(self, s: _StreamState, head: RequestHead, end: bool) -> None:
        if self.state is not ConnState.OPEN:
            raise NotProcessed("the connection to the endpoint is closing (GOAWAY)")
        headers = [(":method", head.method), (":scheme", head.scheme), (":authority", head.authority),
                   (":path", head.path), *forwardable(head.headers)]
        if any("trailers" in t.strip().lower() for v in header_values(head.headers, "te") for t in v.split(",")):
            headers.append(("te", "trailers"))  # the one TE HTTP/2 allows; gRPC servers want it
        try:
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.TooManyStreamsError:
            raise NotProcessed("endpoint lowered its stream limit") from None
        except h2.exceptions.H2Error as exc:
            raise UpstreamReset(f"cannot open a stream to the endpoint: {exc}") from None
        s.stream_id, s.phase, s.request_ended = sid, StreamPhase.OPEN, end
        self._streams[sid] = s
        await self.flush()
        self._raise_if_failed(s)

    async def _send_data(self, s: _StreamState, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._raise_if_failed(s)
            await self._until(lambda: s.phase is not StreamPhase.OPEN or self._window(s) > 0)
            self._raise_if_failed(s)
            n = min(self._window(s), len(view))
            if s.phase is not StreamPhase.OPEN or n <= 0:  # answered and closed: the rest is not wanted
                raise UpstreamReset("the endpoint closed the stream before the request's end")
            try:
                self.conn.send_data(s.stream_id, bytes(view[:n]))
            except h2.exceptions.StreamClosedError:
                raise UpstreamReset("the endpoint closed the stream before the request's end") from None
            view = view[n:]
            await self.flush()

    def _window(self, s: _StreamState) -> int:
        try:
            return min(self.conn.local_flow_control_window(s.stream_id), self.conn.max_outbound_frame_size)
        except h2.exceptions.StreamClosedError:
            return 0

    async def _end_request(self, s: _StreamState, trailers: Headers) -> None:
        self._raise_if_failed(s)
        if s.request_ended:
            return
        s.request_ended = True
        try:
            if trailers:
                self.conn.send_headers(s.stream_id, list(trailers), end_stream=True)
            else:
                self.conn.end_stream(s.stream_id)
        except h2.exceptions.StreamClosedError:
            pass  # the endpoint already answered and closed its side: the exchange goes on
        if s.response_ended and s.phase is StreamPhase.OPEN:
            s.phase = StreamPhase.DONE
        await self.flush()

    async def _receive_head(self, s: _StreamState) -> ResponseHead:
        await self._until(lambda: s.head is not None or s.phase is not StreamPhase.OPEN)
        if s.head is None:
            self._raise_if_failed(s)
            raise UpstreamReset("endpoint reset the stream before answering")
        return s.head

    async def _receive_data(self, s: _StreamState) -> bytes | None:
        """The next chunk of the response body, None at its end."""
        await self._until(lambda: bool(s.data) or s.response_ended or s.phase is not StreamPhase.OPEN)
        if s.data:
            chunk = s.data.popleft()
            self.conn.acknowledge_received_data(len(chunk), s.stream_id)
            await self.flush()
            return chunk
        if s.response_ended:
            return None
        if s.error is not None and s.head is not None:
            raise UpstreamReset(f"{s.error} in the middle of the response", "UR")
        self._raise_if_failed(s)
        raise UpstreamReset("endpoint reset the stream in the middle of the response", "UR")

    def _raise_if_failed(self, s: _StreamState) -> None:
        if s.phase is StreamPhase.FAILED:
            assert s.error is not None
            raise s.error
        if self.state is ConnState.CLOSED and s.phase is StreamPhase.OPEN:
            raise UpstreamReset("connection to endpoint closed")

    async def _close_stream(self, s: _StreamState) -> None:
        """Give the slot back; a stream still open is reset (CANCEL), and what it never read is acknowledged."""
        if s.phase is StreamPhase.CLOSED:
            return
        unfinished = s.phase is StreamPhase.OPEN
        s.phase = StreamPhase.CLOSED
        self.reserved -= 1
        if not self.reserved:
            self.idle_since = self._clock()
        self._streams.pop(s.stream_id, None)
        unread = sum(len(c) for c in s.data)
        s.data.clear()
        if self.state is ConnState.CLOSED or not s.stream_id:
            return
        with trio.CancelScope(shield=True):
            try:
                if unfinished:
                    self.conn.reset_stream(s.stream_id, h2.errors.ErrorCodes.CANCEL)
                if unread:
                    self.conn.acknowledge_received_data(unread, s.stream_id)
            except h2.exceptions.H2Error:
                pass
            await self.flush()


def _code(code: int | None) -> str:
    try:
        return h2.errors.ErrorCodes(code or 0).name
    except ValueError:
        return str(code)


class Http2Stream:
    """One request on an `Http2Connection`: an `UpstreamConnection` whose request can be sent in parts
    (`send_head`, `send_data`, `end_request`) while its response is read."""

    def __init__(self, connection: Http2Connection) -> None:
        self.connection = connection
        self._s = _StreamState()

    async def send_head(self, head: RequestHead, end: bool = False) -> None:
        await self.connection._send_head(self._s, head, end)

    async def send_data(self, data: bytes) -> None:
        await self.connection._send_data(self._s, data)

    async def end_request(self, trailers: Headers = ()) -> None:
        await self.connection._end_request(self._s, trailers)

    async def send_request(self, head: RequestHead, body: AsyncIterable[bytes], trailers: Headers = ()) -> None:
        await self.send_head(head)
        async for chunk in body:
            await self.send_data(chunk)
        await self.end_request(trailers)

    async def receive_response(self) -> ResponseHead:
        return await self.connection._receive_head(self._s)

    async def response_body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.connection._receive_data(self._s)) is not None:
            yield chunk

    @property
    def response_complete(self) -> bool:
        """The response has ended (with the head alone: a trailers-only gRPC answer)."""
        return self._s.response_ended

    @property
    def response_trailers(self) -> Headers:
        return self._s.trailers

    @property
    def reusable(self) -> bool:
        return self._s.phase is StreamPhase.DONE and not self.connection.closed

    async def aclose(self) -> None:
        await self.connection._close_stream(self._s)


class Http2Client:
    """One HTTP/2 connection used one request at a time (a client in tests and tools): each
    `send_request` opens a new stream."""

    def __init__(self, stream: trio.abc.Stream, max_header_bytes: int = 60 * 1024) -> None:
        self.connection = Http2Connection(stream, max_header_bytes)
        self._current: Http2Stream | None = None

    async def send_request(self, head: RequestHead, body: AsyncIterable[bytes], trailers: Headers = ()) -> None:
        if self._current is not None:
            await self._current.aclose()
        self._current = self.connection.open_stream()
        await self._current.send_request(head, body, trailers)

    async def receive_response(self) -> ResponseHead:
        assert self._current is not None
        return await self._current.receive_response()

    def response_body(self) -> AsyncIterator[bytes]:
        assert self._current is not None
        return self._current.response_body()

    @property
    def response_trailers(self) -> Headers:
        return self._current.response_trailers if self._current is not None else ()

    @property
    def reusable(self) -> bool:
        return self._current is not None and self._current.reusable

    async def aclose(self) -> None:
        await self.connection.aclose()
