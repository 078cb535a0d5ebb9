"""HTTP/2 with prior knowledge over trio streams with h2: the server side (concurrent streams, each handed
to the pipeline; the client side toward endpoints is `waypoint.http.http2_client`).

Flow control is real in both directions: received data is acknowledged only as the pipeline consumes
it, and sending waits for the peer's window.  A request head larger than `max_header_bytes` gets 431.
A handler's writes are shielded from its own cancellation (see `flush`); trailers pass both ways
(`request_trailers`, `send_trailers`).

The server bounds what a client can make it spend (the HBONE core's guards, `mesh.hbone.frames`): a
request the client resets has its handler cancelled, and a client that keeps resetting requests gets
GOAWAY ENHANCE_YOUR_CALM (rapid reset); a header block is bounded in bytes across HEADERS and
CONTINUATION frames (ENHANCE_YOUR_CALM), not only in frames as h2 does; and it reads only once what it
had to send went out, so a client that floods PINGs without reading the answers stops being read.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from mesh.hbone.frames import FrameGuard, ResetBudget
from waypoint.errors import HttpError
from waypoint.http.exchange import Handler
from waypoint.l7.model import Headers, RequestHead, ResponseHead, forwardable

READ_SIZE = 65536
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WRITE_TIMEOUT = 10.0  # a client that takes none of a handler's bytes for this long loses the connection
MAX_RESET_STREAMS = 100  # requests a client may abandon beyond those it let us answer (ResetBudget)
HEADER_BLOCK_SLACK = 1024  # what HPACK and framing may add to a header list on the wire
MAX_STREAM_ID = 2**31 - 1
GOAWAY_GRACE = 1.0  # draining: seconds between the first GOAWAY (any stream id) and the final one
LINGER = 1.0  # draining, nothing left to answer: how long the client is given to close the connection itself


def _text(v: str | bytes) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


@dataclass
class _Stream:
    stream_id: int
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    window: trio.Event = field(default_factory=trio.Event)
    reset: bool = False
    ended: bool = False
    trailers: Headers = ()  # the request's trailers, once its body has ended
    handler: trio.CancelScope = field(default_factory=trio.CancelScope)  # server: the request's handler


class _H2Base:
    def __init__(self, stream: trio.abc.Stream, client_side: bool, max_header_bytes: int) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_bytes,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 200,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.max_header_bytes = max_header_bytes
        self._send_lock = trio.Lock()
        self._writes: set[trio.CancelScope] = set()  # handlers' writes in progress
        self._writes_end = math.inf
        self.streams: dict[int, _Stream] = {}
        self.closed = False

    async def flush(self) -> None:
        """A request handler's write.  Shielded from the handler's own cancellation (its stream reset, a
        route timeout): bytes h2 has handed over and that never go out would corrupt the connection for
        every other stream.  It ends only with the connection (`_end_writes`) or after `WRITE_TIMEOUT`
        without the client taking the bytes, and then the connection is closed."""
        async with self._send_lock:
            data = self.conn.data_to_send()
            if not data:
                return
            with trio.CancelScope(shield=True, deadline=min(trio.current_time() + WRITE_TIMEOUT,
                                                           self._writes_end)) as scope:
                self._writes.add(scope)
                try:
                    await self.stream.send_all(data)
                finally:
                    self._writes.discard(scope)
        if scope.cancelled_caught:
            self._terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()  # part of a frame may have gone out: nothing more can follow
            raise trio.BrokenResourceError("the client stopped taking data: connection closed")

    async def _flush_serving(self) -> None:
        """The serving loop's write (it is cancelled only when the whole connection goes)."""
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    def _end_writes(self, at: float) -> None:
        """Handlers' writes end by `at`: the connection is going."""
        self._writes_end = min(self._writes_end, at)
        for scope in self._writes:
            scope.deadline = min(scope.deadline, at)

    def _new_stream(self, stream_id: int) -> _Stream:
        send, receive = trio.open_memory_channel[bytes](math.inf)
        s = self.streams[stream_id] = _Stream(stream_id, send, receive)
        return s

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived) and event.stream_id in self.streams:
            s = self.streams[event.stream_id]
            data = bytes(event.data or b"")
            if data:
                s.send.send_nowait(data)
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding > 0:
                self.conn.acknowledge_received_data(padding, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_id in self.streams:
            self.streams[event.stream_id].trailers = tuple((_text(k).lower(), _text(v)) for k, v in event.headers or [])
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.streams:
            self.streams[event.stream_id].ended = True
            self.streams[event.stream_id].send.close()
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in self.streams:
            s = self.streams[event.stream_id]
            s.reset = True
            s.send.close()
            s.window.set()
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self.streams.values() if event.stream_id == 0 else \
                [self.streams[event.stream_id]] if event.stream_id in self.streams else []
            for s in list(targets):
                s.window.set()
                s.window = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._terminate()

    def _terminate(self) -> None:
        self.closed = True
        for s in self.streams.values():
            s.reset = True
            s.send.close()
            s.window.set()

    async def consumed(self, stream_id: int, n: int) -> None:
        if n and not self.closed and stream_id in self.streams:
            try:
                self.conn.acknowledge_received_data(n, stream_id)
            except h2.exceptions.StreamClosedError:
                return
            await self.flush()

    async def wait_window(self, s: _Stream) -> None:
        await s.window.wait()

    async def send_body(self, s: _Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if s.reset or self.closed:
                raise trio.BrokenResourceError("stream was reset")
            window = min(self.conn.local_flow_control_window(s.stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                await self.wait_window(s)
                continue
            self.conn.send_data(s.stream_id, bytes(view[:window]))
            view = view[window:]
            await self.flush()


class _ServerExchange:
    def __init__(self, server: Http2Server, s: _Stream, head: RequestHead) -> None:
        self._server = server
        self._s = s
        self.head = head
        self._started = False

    @property
    def response_started(self) -> bool:
        return self._started

    async def body(self) -> AsyncIterator[bytes]:
        async for chunk in self._s.receive:
            await self._server.consumed(self._s.stream_id, len(chunk))
            yield chunk
        if self._s.reset and not self._s.ended:
            raise HttpError(400, "client reset the stream")

    async def send_head(self, head: ResponseHead, end: bool = False) -> None:
        self._started = True
        headers = [(":status", str(head.status))] + [(k, v) for k, v in forwardable(head.headers)]
        if self._s.reset or self._server.closed:
            raise trio.BrokenResourceError("stream was reset")
        self._server.conn.send_headers(self._s.stream_id, headers, end_stream=end)
        await self._server.flush()

    async def send_data(self, data: bytes) -> None:
        await self._server.send_body(self._s, data)

    async def end(self) -> None:
        if not self._s.reset and not self._server.closed:
            self._server.conn.end_stream(self._s.stream_id)
            await self._server.flush()

    @property
    def request_trailers(self) -> Headers:
        return self._s.trailers

    async def send_trailers(self, trailers: Headers) -> None:
        """End the response with trailers (gRPC's `grpc-status`)."""
        if self._s.reset or self._server.closed:
            raise trio.BrokenResourceError("stream was reset")
        self._server.conn.send_headers(self._s.stream_id, [(k, v) for k, v in forwardable(trailers)], end_stream=True)
        await self._server.flush()

    async def reset(self) -> None:
        if not self._s.reset and not self._server.closed:
            self._s.reset = True
            self._server.conn.reset_stream(self._s.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self._server.flush()


class Http2Server(_H2Base):
    def __init__(self, stream: trio.abc.Stream, max_header_bytes: int = 60 * 1024, initial: bytes = b"") -> None:
        super().__init__(stream, client_side=False, max_header_bytes=max_header_bytes)
        self._initial = initial
        self._guard = FrameGuard(len(PREFACE), self.conn.max_inbound_frame_size,
                                 max_header_bytes + HEADER_BLOCK_SLACK)
        self._resets = ResetBudget(MAX_RESET_STREAMS)
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._drain_scope = trio.CancelScope()
        self._last_stream: int | None = None  # the final GOAWAY's last stream id: later requests are refused
        self._reading = trio.CancelScope()
        self._linger_until = math.inf  # reading stops then (draining, nothing left to answer)

    def drain(self) -> None:
        """The waypoint is going: the two GOAWAYs of Envoy's drain sequence (`_drain_sequence`)."""
        if self._draining or self.closed:
            return
        self._draining = True
        if self._nursery is not None:  # serving; else `serve` starts it once the connection preface is out
            self._nursery.start_soon(self._drain_sequence)

    async def _drain_sequence(self) -> None:
        """GOAWAY (NO_ERROR) with the highest stream id: the client opens no new request here, and what it
        sent before reading that is still served.  After `GOAWAY_GRACE`, the final GOAWAY names the last
        request received: later ones are refused (REFUSED_STREAM, safe to retry elsewhere), and once the
        requests up to it have been answered the connection closes (when the client closes it, or after
        `LINGER`: closing at once would reset what the client may still be sending)."""
        with self._drain_scope:
            try:
                self._goaway(MAX_STREAM_ID)
                await self._flush_serving()
                await trio.sleep(GOAWAY_GRACE)
                self._last_stream = self.conn.highest_inbound_stream_id
                self._goaway(self._last_stream)
                await self._flush_serving()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            self._stop_reading_when_done()

    def _goaway(self, last_stream_id: int) -> None:
        try:
            self.conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=last_stream_id)
        except h2.exceptions.ProtocolError:  # the connection is already closing
            return
        # h2 takes a GOAWAY it sends for the end of the connection; these let the streams below them finish
        self.conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN

    def _stop_reading_when_done(self) -> None:
        if self._last_stream is not None and not self.streams and self._linger_until == math.inf:
            self._linger_until = trio.current_time() + LINGER
            self._reading.deadline = self._linger_until

    async def serve(self, handler: Handler) -> None:
        self.conn.initiate_connection()
        try:
            await self._flush_serving()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._draining:  # asked before it started
                    nursery.start_soon(self._drain_sequence)
                try:
                    await self._serve_loop(nursery, handler)
                except BaseException:
                    self._end_writes(-math.inf)
                    raise
                self._drain_scope.cancel()  # the connection is over: no GOAWAY to come
                self._terminate()
                grace = trio.current_time() + 1.0
                nursery.cancel_scope.deadline = grace
                self._end_writes(grace)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):  # (from the body too: in a group)
            self._terminate()
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await self.stream.aclose()

    async def _serve_loop(self, nursery: trio.Nursery, handler: Handler) -> None:
        data = self._initial
        while not self.closed:
            if not data:
                with self._reading:
                    data = bytes(await self.stream.receive_some(READ_SIZE))
                if self._reading.cancelled_caught:
                    break  # drained: no request left to answer, and the client has not closed
                self._reading = trio.CancelScope(deadline=self._linger_until)
                if not data:
                    break
            refused = self._guard.check(data)
            if refused is not None:
                self._abort(refused.error_code, refused.reason)
                await self._flush_serving()
                break
            try:
                events = self.conn.receive_data(bytes(data))
            except h2.exceptions.ProtocolError:
                await self._flush_serving()
                break
            data = b""
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    self._start(nursery, handler, event)
                elif isinstance(event, h2.events.StreamReset):
                    self._on_reset(event)
                else:
                    self._on_event(event)
            if self._resets.exhausted:
                self._abort(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, self._resets.reason())
                await self._flush_serving()
                break
            await self._flush_serving()

    def _abort(self, code: int, reason: str) -> None:
        """GOAWAY with `code` (h2 then refuses anything more); the loop stops reading."""
        self.conn.close_connection(code, additional_data=reason.encode("utf-8")[:256])

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        s = self.streams.get(event.stream_id) if event.stream_id is not None else None
        if s is not None and not s.reset:
            self._resets.abandoned()  # reset while its handler still ran: what a rapid reset does
            s.handler.cancel()
        self._on_event(event)

    def _start(self, nursery: trio.Nursery, handler: Handler, event: h2.events.RequestReceived) -> None:
        if self._last_stream is not None and event.stream_id > self._last_stream:
            self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)  # after our GOAWAY
            return
        s = self._new_stream(event.stream_id)
        pairs = [(_text(k), _text(v)) for k, v in event.headers or []]
        pseudo = {k: v for k, v in pairs if k.startswith(":")}
        size = sum(len(k) + len(v) + 32 for k, v in pairs)
        head = RequestHead(method=pseudo.get(":method", "GET"), path=pseudo.get(":path", "/"),
                           authority=pseudo.get(":authority", ""), scheme=pseudo.get(":scheme", "http"),
                           headers=tuple((k.lower(), v) for k, v in pairs if not k.startswith(":")),
                           protocol="HTTP/2")
        if event.stream_ended is not None:
            s.ended = True
            s.send.close()
        exchange = _ServerExchange(self, s, head)
        nursery.start_soon(self._run, handler, exchange, size)

    async def _run(self, handler: Handler, exchange: _ServerExchange, size: int) -> None:
        scope = exchange._s.handler
        try:
            with scope:
                if scope.cancel_called:  # reset in the same read as its HEADERS: never started
                    return
                if size > self.max_header_bytes:
                    raise HttpError(431, "request headers too large")
                await handler(exchange)
            if not scope.cancelled_caught and not exchange._s.reset:
                self._resets.carried()
        except HttpError as exc:
            if not exchange.response_started:
                body = str(exc).encode()
                try:
                    await exchange.send_head(ResponseHead(exc.status, (("content-length", str(len(body))),)))
                    await exchange.send_data(body)
                    await exchange.end()
                except (trio.BrokenResourceError, h2.exceptions.H2Error):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.H2Error):
            pass
        finally:
            self.streams.pop(exchange._s.stream_id, None)
            self._stop_reading_when_done()
