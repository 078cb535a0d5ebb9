"""The HBONE protocol core, sans-IO: HTTP/2 CONNECT tunnels, bytes in, events out.

    client = HboneClient(HboneConfig(), now=clock())
    sid = client.open_stream("10.244.1.5:8080", request_headers(forwarded_for="10.244.0.7:41234"))
    transport.write(client.data_to_send())
    for event in client.receive_data(transport.read()):   # StreamAccepted, DataReceived, ...
        ...
    client.on_timer(clock())                              # when clock() >= client.next_deadline()

`HboneServer` is the other side: `ConnectRequested` events, answered with `accept()` or `reject()`;
malformed requests are answered 400 by the core and never reach the application.

Both sides grant the windows and frame size of `HboneConfig`, keep unsent tunnel bytes per stream until
the peer's windows allow them (`can_send()` says when a writer should wait, `StreamWritable` when it
may go on), and acknowledge received bytes only when the reader says it consumed them
(`acknowledge()`), so a slow reader slows its writer instead of growing a buffer.  Half-close is
END_STREAM both ways.  Keepalive PINGs and their timeout run off `next_deadline()`/`on_timer(now)`.

Streams are the core's own, not `h2`'s: their frames (DATA, HEADERS and CONTINUATION, RST_STREAM,
WINDOW_UPDATE) are read (`frames.FrameReader`) and written here, header blocks are encoded with
`frames.LiteralEncoder` (blocks made that way are read in one pass, `frames.decode_plain_block`; others
with `hpack`), and the stream ids, states and both directions' flow-control windows are kept here.  `h2`
keeps the connection's own frames: the preface and SETTINGS (and their acknowledgements), PING, GOAWAY,
and refusing a PUSH_PROMISE.  A new connection's tunnel is thus a few frames built and parsed here, not
h2's per-stream state machines.  Everything sent goes into one ordered output, h2's bytes taken as soon
as it produced them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack

from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import (
    ConnectionNotUsableError,
    ProtocolUsageError,
)
from mesh.hbone.events import (
    ConnectionClosed,
    ConnectionDraining,
    DataReceived,
    Event,
    PingAcknowledged,
    StreamEnded,
    StreamRejected,
    StreamReset,
    StreamWritable,
)
from mesh.hbone.frames import (
    MAX_WINDOW,
    PREFACE,
    ErrorCode,
    FrameGuard,
    FrameReader,
    LiteralEncoder,
    ResetBudget,
    Violation,
    data_header,
    decode_plain_block,
    error_name,
    headers_frames,
    rst_stream,
    window_update,
)
from mesh.hbone.state import (
    PENDING_STATES,
    RECEIVING_STATES,
    SENDING_STATES,
    TERMINAL_STREAM_STATES,
    ConnectionInput,
    ConnectionState,
    StreamInput,
    StreamState,
    next_connection_state,
    next_stream_state,
)

_H2_OPEN = {True: h2.connection.ConnectionState.CLIENT_OPEN, False: h2.connection.ConnectionState.SERVER_OPEN}
_SETTING = h2.settings.SettingCodes
DEFAULT_WINDOW = 65_535  # HTTP/2's initial windows, until SETTINGS say otherwise


@dataclass(eq=False, slots=True)
class TunnelStream:
    id: int
    send_window: int = DEFAULT_WINDOW  # what the peer lets us send on this stream
    recv_window: int = DEFAULT_WINDOW  # what we let the peer send on it
    state: StreamState = StreamState.PENDING
    outbound: bytearray = field(default_factory=bytearray)  # accepted from the writer, not yet framed
    fin_queued: bool = False  # END_STREAM goes out after `outbound`
    blocked: bool = False  # the writer was told to wait (can_send false); tell it when to go on
    reject_status: int | None = None  # client: a rejection whose body is still being read
    reject_body: bytearray = field(default_factory=bytearray)
    consumed: int = 0  # received bytes acknowledged but not yet given back in a WINDOW_UPDATE

    def advance(self, event: StreamInput) -> None:
        self.state = next_stream_state(self.state, event)


class HboneConnection:
    """What client and server share.  Not used directly: make an `HboneClient` or `HboneServer`."""

    _client_side: bool

    def __init__(self, config: HboneConfig | None = None, *, now: float = 0.0) -> None:
        self.config = config = config or HboneConfig()
        self._state = ConnectionState.OPEN
        self._streams: dict[int, TunnelStream] = {}
        h2_config = h2.config.H2Configuration(
            client_side=self._client_side,
            header_encoding=None,
            # The server checks requests itself so that a malformed one costs one 400, not the connection.
            validate_inbound_headers=self._client_side,
            # What this side sends is built here from checked parts (`open_stream`, the answers).
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(h2_config)
        self._h2.encoder = LiteralEncoder()
        self._out: list[bytes] = []  # what goes out next, in order: h2's bytes and our own frames
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: config.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: config.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: config.max_header_list_size,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                0 if self._client_side else config.max_concurrent_streams
            ),
        }
        if self._client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client=self._client_side, initial_values=settings)
        self._h2.max_inbound_frame_size = config.max_frame_size
        # The header blocks of streams are decoded here (h2 sees none); decoded lists are bounded from the
        # first request on, not only once our SETTINGS are acked.
        self._decoder = hpack.Decoder(max_header_list_size=config.max_header_list_size)
        self._highest_inbound = 0  # the highest stream id the peer opened
        self._next_stream_id = 1 if self._client_side else 2  # the next one this side opens
        self._h2.initiate_connection()
        increment = config.connection_window - 65_535
        if increment > 0:
            self._h2.increment_flow_control_window(increment)
        # Flow control of DATA is ours (h2 never sees a DATA payload): the peer's windows for what we
        # send, ours for what it sends, and what was consumed but not yet given back.
        self._send_window = DEFAULT_WINDOW
        self._peer_stream_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._max_send_frame = 16_384  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._recv_window = config.connection_window
        self._consumed = 0
        self._update_at = config.connection_window // 2  # give back the connection window in halves
        self._stream_update_at = config.stream_window // 2
        self._windows_grew = False
        self._events: list[Event] = []  # what the batch being read has produced so far
        # h2 buffers a whole frame (and a whole header block) before it checks its length; look at each
        # frame header as it arrives.
        self._frame_guard = FrameGuard(0, config.max_frame_size, config.max_header_block)
        self._reader = FrameReader(self._frame_guard, 0 if self._client_side else len(PREFACE), self._rx_h2,
                                   self._rx_data, self._rx_window, self._rx_headers, self._rx_reset,
                                   self._rx_violation)
        self._take_h2()
        self._resets = ResetBudget(config.max_reset_streams)
        self._unsent_control = 0  # PING and SETTINGS answers h2 queued since the transport last took output
        self._ping_due: float = now + config.ping_interval
        self._ping_outstanding: bytes | None = None
        self._ping_deadline: float = 0.0
        self._ping_counter = 0

    # -- what the transport reads ------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def active_streams(self) -> int:
        """Tunnels not yet finished (pending, open or half-closed), as this side counts them."""
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState | None:
        stream = self._streams.get(stream_id)
        return stream.state if stream else None

    def has_output(self) -> bool:
        """Whether `data_to_send()` would return bytes, so a transport wakes its writer only then."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        self._unsent_control = 0  # the transport takes the output only once it could write the last
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_h2(self) -> None:
        """Move what h2 produced to the output, so that it goes out before any frame we add next.  Every
        call into h2 that can produce bytes (setting up, reading its frames, PING, GOAWAY) is followed by
        this one, so `_out` alone holds all there is to send: `has_output` and `data_to_send` ask h2
        nothing, on a path taken for every read and write."""
        produced = self._h2.data_to_send()
        if produced:
            self._out.append(produced)

    @property
    def send_window(self) -> int:
        """How many bytes the peer's connection window lets this side send now."""
        return self._send_window

    def buffered(self, stream_id: int) -> int:
        """Bytes accepted for `stream_id` that still wait for the peer's window."""
        stream = self._streams.get(stream_id)
        return len(stream.outbound) if stream else 0

    def can_send(self, stream_id: int) -> bool:
        """Whether a writer may hand over more bytes now (else wait for `StreamWritable`)."""
        stream = self._streams.get(stream_id)
        if stream is None or not self._may_send(stream):
            return False
        return len(stream.outbound) < self.config.send_buffer_low_water

    def _may_send(self, stream: TunnelStream) -> bool:
        """Open for sending; or, on the client, a CONNECT not answered yet: early data, which the server
        holds until it is connected upstream and drops if it refuses the stream (RFC 9113 allows DATA
        on an open stream before the response).  END_STREAM still waits for the answer."""
        state = stream.state
        return state in SENDING_STATES or (state is StreamState.PENDING and self._client_side)

    # -- bytes in ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the transport; returns what happened."""
        out: list[Event] = []
        if self._state is ConnectionState.CLOSED:
            return out
        self._events = out
        self._reader.feed(data if isinstance(data, bytes) else bytes(data))
        self._events = []
        if self._state is ConnectionState.CLOSED:
            return out
        if self._unsent_control > self.config.max_unsent_control_frames:
            self._finish(out, ErrorCode.ENHANCE_YOUR_CALM,
                         f"peer sent over {self.config.max_unsent_control_frames} PING or SETTINGS frames "
                         "without reading the answers", by_peer=False, send_goaway=True)
        if self._resets.exhausted:
            self._finish(out, ErrorCode.ENHANCE_YOUR_CALM, self._resets.reason(), by_peer=False, send_goaway=True)
        if self._windows_grew:
            self._windows_grew = False
            self._flush_all(out)
        self._check_drained(out)
        return out

    # -- what the frame reader hands over (each returns False once the connection is closed) --------------

    def _rx_h2(self, data: bytes) -> bool:
        out = self._events
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has already queued a GOAWAY; tell every stream and stop.
            self._take_h2()
            code = getattr(exc, "error_code", ErrorCode.PROTOCOL_ERROR)
            self._finish(
                out, code, f"peer broke the HTTP/2 protocol: {exc}", by_peer=False, send_goaway=False
            )
            return False
        self._take_h2()
        for event in h2_events:
            self._handle(event, out)
            if self._state is ConnectionState.CLOSED:
                return False
        return True

    def _rx_violation(self, violation: Violation) -> None:
        self._finish(self._events, violation.error_code, violation.reason, by_peer=False, send_goaway=True)

    def _is_idle(self, stream_id: int) -> bool:
        """A stream id never used yet (frames for it, other than HEADERS, are a protocol error)."""
        if self._is_local_stream(stream_id):
            return stream_id >= self._next_stream_id
        return stream_id > self._highest_inbound

    def _rx_data(self, stream_id: int, data: bytes | memoryview, cost: int, length: int, end: bool) -> bool:
        if cost:
            if not stream_id or self._is_idle(stream_id):
                self._rx_violation(Violation(ErrorCode.PROTOCOL_ERROR,
                                             f"peer sent DATA on stream {stream_id}, which it never opened"))
                return False
            self._recv_window -= cost
            if self._recv_window < 0:
                self._rx_violation(Violation(ErrorCode.FLOW_CONTROL_ERROR,
                                             "peer sent more DATA than the connection's window allows"))
                return False
        stream = self._streams.get(stream_id)
        if stream is None:  # reset or finished: nobody will read it, give the window back at once
            self._consume(length)
            return True
        if cost:
            stream.recv_window -= cost
            if stream.recv_window < 0:
                self._consume(length)
                self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR,
                                   "peer sent more DATA than the stream's window allows")
                return True
        state = stream.state
        if state is StreamState.REJECTED:
            room = self.config.reject_body_limit - len(stream.reject_body)
            if room > 0:
                stream.reject_body += data[:room]
            self._consume(length)
            if end:  # the reason is complete (h2 is told by the reset, not asked to count the body)
                self._finish_rejection(stream, self._events)
            return True
        if state in RECEIVING_STATES:
            if data:
                self._events.append(DataReceived(stream_id, data, length))
            elif length:
                self._consume(length)
        else:  # DATA after the peer's END_STREAM
            self._consume(length)
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, "peer sent DATA after it ended the stream")
            return True
        if end:
            self._remote_end(stream)
        return True

    def _rx_headers(self, stream_id: int, end: bool, block: bytes) -> bool:
        """A whole header block: a request (server), an answer (client), or trailers ending a tunnel."""
        try:  # decoded even for a stream refused below: the decoder's table must follow the peer's
            headers = decode_plain_block(block, self.config.max_header_list_size)
            if headers is None:  # (any other block: hpack reads it, or says what is wrong with it)
                headers = cast("list[tuple[bytes, bytes]]", self._decoder.decode(block, raw=True))
        except hpack.OversizedHeaderListError as exc:
            self._rx_violation(Violation(ErrorCode.ENHANCE_YOUR_CALM, f"peer sent too large a header list: {exc}"))
            return False
        except hpack.HPACKError as exc:
            self._rx_violation(Violation(ErrorCode.COMPRESSION_ERROR, f"peer sent a header block HPACK cannot "
                                                                     f"decode: {exc}"))
            return False
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._headers_on_stream(stream, end, headers)
        elif self._is_local_stream(stream_id):
            if stream_id >= self._next_stream_id:
                self._rx_violation(Violation(ErrorCode.PROTOCOL_ERROR,
                                             f"peer sent HEADERS on stream {stream_id}, which was never opened"))
                return False
            # a stream this side finished or reset: what the peer sent before it knew is dropped
        elif self._client_side:
            self._rx_violation(Violation(ErrorCode.PROTOCOL_ERROR,
                                         f"peer opened stream {stream_id}: an HBONE server opens none"))
            return False
        elif stream_id <= self._highest_inbound:
            pass  # a tunnel already finished, refused or reset: ignored, as RFC 9113 5.1 asks after a reset
        else:
            self._highest_inbound = stream_id
            self._on_request(stream_id, end, headers, self._events)
        return self._state is not ConnectionState.CLOSED

    def _headers_on_stream(self, stream: TunnelStream, end: bool, headers: list[tuple[bytes, bytes]]) -> None:
        """A header block on a stream already open: the answer to a CONNECT (client), else trailers,
        which a tunnel only takes to end it."""
        if stream.state is StreamState.PENDING and self._client_side:
            self._on_response(stream, end, headers, self._events)
        elif stream.state is StreamState.REJECTED:  # trailers after a rejection's reason: it is complete
            self._finish_rejection(stream, self._events)
        elif stream.state not in RECEIVING_STATES:
            self._stream_error(stream, ErrorCode.STREAM_CLOSED, f"peer sent HEADERS on a stream {stream.state.value}")
        elif not end:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, "peer sent HEADERS in the middle of a tunnel")
        else:
            self._remote_end(stream)

    def _rx_reset(self, stream_id: int, code: int) -> bool:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._on_stream_reset(stream, code, self._events)
        elif self._is_idle(stream_id):
            self._rx_violation(Violation(ErrorCode.PROTOCOL_ERROR,
                                         f"peer reset stream {stream_id}, which was never opened"))
            return False
        return True

    def _rx_window(self, stream_id: int, increment: int) -> bool:
        if not stream_id:
            if not increment:
                self._rx_violation(Violation(ErrorCode.PROTOCOL_ERROR, "peer sent a WINDOW_UPDATE of 0"))
                return False
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                self._rx_violation(Violation(ErrorCode.FLOW_CONTROL_ERROR,
                                             "peer grew the connection's window over 2^31-1"))
                return False
            self._windows_grew = True
            return True
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_idle(stream_id):
                self._rx_violation(Violation(ErrorCode.PROTOCOL_ERROR,
                                             f"peer sent WINDOW_UPDATE on stream {stream_id}, which was never opened"))
                return False
            return True
        if not increment:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, "peer sent a WINDOW_UPDATE of 0")
            return True
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR, "peer grew a stream's window over 2^31-1")
            return True
        self._windows_grew = True
        return True

    def _stream_error(self, stream: TunnelStream, code: int, reason: str) -> None:
        """The peer broke the protocol on one stream: reset it (RST_STREAM `code`), the others go on."""
        self._send_reset(stream.id, code)
        if stream.state not in TERMINAL_STREAM_STATES:
            stream.advance(StreamInput.RESET)
            self._events.append(StreamReset(stream.id, code, reason, by_peer=False))
        self._forget(stream)

    def _consume(self, length: int) -> None:
        """`length` received bytes are gone (consumed or discarded): give the connection's window back."""
        self._consumed += length
        if self._consumed >= self._update_at:
            self._out.append(window_update(0, self._consumed))
            self._recv_window += self._consumed
            self._consumed = 0

    def _handle(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == self._ping_outstanding:
                self._ping_outstanding = None
                out.append(PingAcknowledged(event.ping_data or b""))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event, out)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._unsent_control += 1  # h2 queued the ACK
            self._on_settings(event, out)
        elif isinstance(event, h2.events.PingReceived):
            self._unsent_control += 1  # h2 queued the ACK
        # Window updates and settings changes are handled by the flush after every batch; unknown frames
        # mean nothing to a tunnel.  (h2 sees no frame of a stream: it produces no stream events.)

    def _on_settings(self, event: h2.events.RemoteSettingsChanged, out: list[Event]) -> None:
        changed = event.changed_settings
        window = changed.get(_SETTING.INITIAL_WINDOW_SIZE)
        if window is not None:
            delta = window.new_value - self._peer_stream_window
            self._peer_stream_window = window.new_value
            for stream in self._streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    self._finish(out, ErrorCode.FLOW_CONTROL_ERROR,
                                 "peer's SETTINGS grew a stream's window over 2^31-1", by_peer=False, send_goaway=True)
                    return
            self._windows_grew = True
        frame_size = changed.get(_SETTING.MAX_FRAME_SIZE)
        if frame_size is not None:
            self._max_send_frame = frame_size.new_value

    def _new_stream(self, stream_id: int) -> TunnelStream:
        stream = TunnelStream(stream_id, self._peer_stream_window, self.config.stream_window)
        self._streams[stream_id] = stream
        return stream

    def _on_request(self, stream_id: int, end: bool, headers: list[tuple[bytes, bytes]], out: list[Event]) -> None:
        # Only a server gets here; HboneServer overrides it.
        self._send_reset(stream_id, ErrorCode.PROTOCOL_ERROR)

    def _on_response(self, stream: TunnelStream, end: bool, headers: list[tuple[bytes, bytes]],
                     out: list[Event]) -> None:
        # Only a client gets here; HboneClient overrides it.
        self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, "peer answered a stream it opened")

    def _remote_end(self, stream: TunnelStream) -> None:
        """The peer's END_STREAM (its FIN)."""
        if stream.state is StreamState.REJECTED:
            self._finish_rejection(stream, self._events)
            return
        stream.advance(StreamInput.REMOTE_END)
        self._events.append(StreamEnded(stream.id))
        self._forget_if_done(stream)

    def _on_stream_reset(self, stream: TunnelStream, code: int, out: list[Event]) -> None:
        if stream.state is StreamState.REJECTED:
            self._finish_rejection(stream, out, reset=False)  # never a reset in answer to a reset
            return
        if stream.state in PENDING_STATES and not self._is_local_stream(stream.id):
            self._resets.abandoned()  # reset before this side answered: what a rapid reset does
        stream.advance(StreamInput.RESET)
        out.append(StreamReset(stream.id, code, f"reset by peer ({error_name(code)})", by_peer=True))
        self._forget(stream)

    def _finish_rejection(self, stream: TunnelStream, out: list[Event], reset: bool = True) -> None:
        if stream.reject_status is not None:
            reason = stream.reject_body.decode("utf-8", "replace").strip()
            out.append(StreamRejected(stream.id, stream.reject_status, reason))
            stream.reject_status = None
        if reset:  # the answer is all read: the CONNECT's side of the stream is not needed (it sent no END)
            self._send_reset(stream.id, ErrorCode.NO_ERROR)
        self._forget(stream)

    def _on_goaway(self, event: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        code = int(event.error_code or 0)
        last = int(event.last_stream_id or 0)
        if code != ErrorCode.NO_ERROR:
            debug = (event.additional_data or b"").decode("utf-8", "replace")
            detail = f": {debug}" if debug else ""
            self._finish(
                out,
                code,
                f"peer closed the connection ({error_name(code)}){detail}",
                by_peer=True,
                send_goaway=False,
            )
            return
        # A graceful GOAWAY: h2 stops, but streams the peer took may still finish.
        self._h2.state_machine.state = _H2_OPEN[self._client_side]
        self._state = next_connection_state(self._state, ConnectionInput.GOAWAY_RECEIVED)
        out.append(ConnectionDraining(code, last, by_peer=True))
        for stream in list(self._streams.values()):
            if self._is_local_stream(stream.id) and stream.id > last:
                self._send_reset(stream.id, ErrorCode.REFUSED_STREAM)
                stream.advance(StreamInput.RESET)
                out.append(
                    StreamReset(
                        stream.id,
                        ErrorCode.REFUSED_STREAM,
                        "the peer is shutting down (GOAWAY) and did not take this stream: retry on a new connection",
                        by_peer=True,
                    )
                )
                self._forget(stream)

    def _is_local_stream(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self._client_side

    # -- bytes out ---------------------------------------------------------------------------------------

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue tunnel bytes; they go out as the peer's windows allow.  Check `can_send()` first: the
        core takes what it is given, and the writer is the one that must wait.  Returns what `can_send()`
        would say next, so that a writer need not ask."""
        stream = self._sending_stream(stream_id)
        n = len(data)
        if n and not stream.outbound and n <= self._max_send_frame and n <= stream.send_window \
                and n <= self._send_window:  # the usual case: one DATA frame, at once
            out = self._out
            out.append(data_header(stream_id, n))
            out.append(data if isinstance(data, bytes) else bytes(data))
            stream.send_window -= n
            self._send_window -= n
            return True
        if n:
            stream.outbound += data
            self._flush(stream)
        if len(stream.outbound) >= self.config.send_buffer_low_water:
            stream.blocked = True
            return False
        return True

    def end_stream(self, stream_id: int) -> list[Event]:
        """Half-close: END_STREAM after the queued bytes (the tunnel's FIN).  The events are empty
        unless that finished the last stream of a draining connection (`ConnectionClosed`)."""
        stream = self._sending_stream(stream_id)
        if stream.state is StreamState.PENDING:
            raise ProtocolUsageError(f"stream {stream_id} cannot end before the CONNECT is answered")
        stream.advance(StreamInput.LOCAL_END)
        stream.fin_queued = True
        self._flush(stream)
        self._forget_if_done(stream)
        return self._drained_events()

    def reset(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> list[Event]:
        """Abort a tunnel (RST_STREAM).  Unknown or finished streams are left alone."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state in TERMINAL_STREAM_STATES:
            return []
        self._send_reset(stream_id, error_code)
        stream.advance(StreamInput.RESET)
        self._forget(stream)
        return self._drained_events()

    def _drained_events(self) -> list[Event]:
        out: list[Event] = []
        self._check_drained(out)
        return out

    def acknowledge(self, stream_id: int, length: int) -> None:
        """`length` received bytes of `stream_id` were consumed: let the peer send that much more (a
        WINDOW_UPDATE goes out once half a window was consumed, for the stream and for the connection)."""
        if length <= 0 or self._state is ConnectionState.CLOSED:
            return
        self._consume(length)
        stream = self._streams.get(stream_id)
        if stream is not None and stream.state in RECEIVING_STATES:
            stream.consumed += length
            if stream.consumed >= self._stream_update_at:
                self._out.append(window_update(stream_id, stream.consumed))
                stream.recv_window += stream.consumed
                stream.consumed = 0

    def _sending_stream(self, stream_id: int) -> TunnelStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ProtocolUsageError(f"stream {stream_id} is not an open HBONE tunnel")
        if not self._may_send(stream) or stream.fin_queued:
            raise ProtocolUsageError(f"stream {stream_id} cannot send while {stream.state.value}")
        if self._state is ConnectionState.CLOSED:
            raise ConnectionNotUsableError("the HBONE connection is closed")
        return stream

    def _flush(self, stream: TunnelStream) -> None:
        """Frame as much of `stream`'s queue as the windows allow; then its END_STREAM, if queued."""
        queue, out = stream.outbound, self._out
        while queue:
            size = min(stream.send_window, self._send_window, self._max_send_frame, len(queue))
            if size <= 0:
                return
            out.append(data_header(stream.id, size))
            out.append(bytes(queue[:size]))
            del queue[:size]
            stream.send_window -= size
            self._send_window -= size
        if stream.fin_queued:
            out.append(data_header(stream.id, 0, end_stream=True))
            stream.fin_queued = False

    def _flush_all(self, out: list[Event]) -> None:
        if self._state is ConnectionState.CLOSED:
            return
        for stream in list(self._streams.values()):
            if stream.outbound or stream.fin_queued:
                self._flush(stream)
            if stream.blocked and len(stream.outbound) < self.config.send_buffer_low_water:
                stream.blocked = False
                out.append(StreamWritable(stream.id))
            self._forget_if_done(stream)

    def _send_reset(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM (callers send it only on streams not closed both ways: RFC 9113 5.1)."""
        self._out.append(rst_stream(stream_id, error_code))

    def _send_headers(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool = False) -> None:
        fields = [(name.encode(), value.encode()) for name, value in headers]
        block = self._h2.encoder.encode(fields)  # h2 keeps the encoder: a peer's new table size reaches it
        self._out.append(headers_frames(stream_id, block, end_stream, self._max_send_frame))

    def _forget_if_done(self, stream: TunnelStream) -> None:
        done = stream.state in TERMINAL_STREAM_STATES and not stream.outbound and not stream.fin_queued
        if done and stream.reject_status is None:  # a rejection is kept until its reason has been read
            self._forget(stream)

    def _forget(self, stream: TunnelStream) -> None:
        self._streams.pop(stream.id, None)

    # -- the connection as a whole -----------------------------------------------------------------------

    def goaway(self) -> list[Event]:
        """Graceful shutdown: a GOAWAY; streams already started may finish, no new ones are taken."""
        out: list[Event] = []
        if self._state is not ConnectionState.OPEN:
            return out
        last = self._highest_inbound
        self._h2.close_connection(ErrorCode.NO_ERROR, last_stream_id=last)
        self._take_h2()
        self._h2.state_machine.state = _H2_OPEN[self._client_side]
        self._state = next_connection_state(self._state, ConnectionInput.GOAWAY_SENT)
        out.append(ConnectionDraining(ErrorCode.NO_ERROR, last, by_peer=False))
        self._check_drained(out)
        return out

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> list[Event]:
        """Close now: GOAWAY, every remaining tunnel reset."""
        out: list[Event] = []
        self._finish(out, error_code, reason, by_peer=False, send_goaway=True)
        return out

    def connection_lost(self, reason: str) -> list[Event]:
        """The transport went away (EOF, reset, TLS error): every remaining tunnel is reset."""
        out: list[Event] = []
        self._finish(out, ErrorCode.NO_ERROR, reason, by_peer=True, send_goaway=False)
        return out

    def _finish(self, out: list[Event], code: int, reason: str, *, by_peer: bool, send_goaway: bool) -> None:
        if self._state is ConnectionState.CLOSED:
            return
        if send_goaway:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(code, additional_data=reason.encode("utf-8")[:256],
                                          last_stream_id=self._highest_inbound)
            self._take_h2()
        failed = by_peer or code != ErrorCode.NO_ERROR
        self._state = next_connection_state(
            self._state, ConnectionInput.FAILED if failed else ConnectionInput.CLOSE
        )
        for stream in list(self._streams.values()):
            if stream.state is StreamState.REJECTED:
                self._finish_rejection(stream, out)
                continue
            if stream.state not in TERMINAL_STREAM_STATES:
                stream.advance(StreamInput.RESET)
                out.append(StreamReset(stream.id, code, f"connection closed: {reason}", by_peer=by_peer))
            self._forget(stream)
        out.append(ConnectionClosed(code, reason, by_peer))

    def _check_drained(self, out: list[Event]) -> None:
        if self._state is ConnectionState.DRAINING and not self._streams:
            self._state = next_connection_state(self._state, ConnectionInput.CLOSE)
            out.append(ConnectionClosed(ErrorCode.NO_ERROR, "drained after GOAWAY", by_peer=False))

    # -- time --------------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `on_timer` must next be called (None: the connection is closed)."""
        if self._state is ConnectionState.CLOSED:
            return None
        return self._ping_deadline if self._ping_outstanding is not None else self._ping_due

    def on_timer(self, now: float) -> list[Event]:
        """Send a keepalive PING when one is due; close the connection if the last one went unanswered."""
        out: list[Event] = []
        if self._state is ConnectionState.CLOSED:
            return out
        if self._ping_outstanding is not None:
            if now >= self._ping_deadline:
                timeout = self.config.ping_timeout
                self._finish(
                    out,
                    ErrorCode.NO_ERROR,
                    f"peer did not answer a PING within {timeout:g}s: is the other side overloaded or gone?",
                    by_peer=False,
                    send_goaway=True,
                )
            return out
        if now >= self._ping_due:
            self._ping_counter += 1
            payload = self._ping_counter.to_bytes(8, "big")
            self._h2.ping(payload)
            self._take_h2()
            self._ping_outstanding = payload
            self._ping_deadline = now + self.config.ping_timeout
            self._ping_due = now + self.config.ping_interval
        return out
