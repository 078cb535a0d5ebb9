"""The HBONE protocol core, sans-IO: HTTP/2 CONNECT tunnels over `h2`, bytes in, events out.

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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

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
from mesh.hbone.frames import PREFACE, ErrorCode, FrameGuard, ResetBudget, error_name
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


@dataclass(eq=False)
class TunnelStream:
    id: int
    state: StreamState = StreamState.PENDING
    outbound: bytearray = field(default_factory=bytearray)  # accepted from the writer, not yet framed
    fin_queued: bool = False  # END_STREAM goes out after `outbound`
    blocked: bool = False  # the writer was told to wait (can_send false); tell it when to go on
    reject_status: int | None = None  # client: a rejection whose body is still being read
    reject_body: bytearray = field(default_factory=bytearray)

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
        )
        self._h2 = h2.connection.H2Connection(h2_config)
        self._held = bytearray()  # bytes h2 produced that `data_to_send` has not handed out yet
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
        # Bound decoded header lists from the first request on, not only once our SETTINGS are acked.
        self._h2.decoder.max_header_list_size = config.max_header_list_size
        self._h2.initiate_connection()
        increment = config.connection_window - 65_535
        if increment > 0:
            self._h2.increment_flow_control_window(increment)
        # h2 buffers a whole frame (and a whole header block) before it checks its length; look at each
        # frame header as it arrives.
        self._frame_guard = FrameGuard(0 if self._client_side else len(PREFACE), config.max_frame_size,
                                       config.max_header_block)
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
        produced = self._h2.data_to_send()  # kept, in order, ahead of anything h2 produces later
        if produced:
            self._held += produced
        return bool(self._held)

    def data_to_send(self) -> bytes:
        self._unsent_control = 0  # the transport takes the output only once it could write the last
        if self._held:
            held, self._held = bytes(self._held), bytearray()
            return held + self._h2.data_to_send()
        return self._h2.data_to_send()

    def buffered(self, stream_id: int) -> int:
        """Bytes accepted for `stream_id` that still wait for the peer's window."""
        stream = self._streams.get(stream_id)
        return len(stream.outbound) if stream else 0

    def can_send(self, stream_id: int) -> bool:
        """Whether a writer may hand over more bytes now (else wait for `StreamWritable`)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in SENDING_STATES:
            return False
        return len(stream.outbound) < self.config.send_buffer_low_water

    # -- bytes in ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the transport; returns what happened."""
        out: list[Event] = []
        if self._state is ConnectionState.CLOSED:
            return out
        refused = self._frame_guard.check(data)
        if refused is not None:
            self._finish(out, refused.error_code, refused.reason, by_peer=False, send_goaway=True)
            return out
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has already queued a GOAWAY; tell every stream and stop.
            code = getattr(exc, "error_code", ErrorCode.PROTOCOL_ERROR)
            self._finish(
                out, code, f"peer broke the HTTP/2 protocol: {exc}", by_peer=False, send_goaway=False
            )
            return out
        for event in h2_events:
            self._handle(event, out)
            if self._state is ConnectionState.CLOSED:
                break
        if self._unsent_control > self.config.max_unsent_control_frames:
            self._finish(out, ErrorCode.ENHANCE_YOUR_CALM,
                         f"peer sent over {self.config.max_unsent_control_frames} PING or SETTINGS frames "
                         "without reading the answers", by_peer=False, send_goaway=True)
        if self._resets.exhausted:
            self._finish(out, ErrorCode.ENHANCE_YOUR_CALM, self._resets.reason(), by_peer=False, send_goaway=True)
        self._flush_all(out)
        self._check_drained(out)
        return out

    def _handle(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event, out)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event, out)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event, out)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_stream_ended(event, out)
        elif isinstance(event, h2.events.StreamReset):
            self._on_stream_reset(event, out)
        elif isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == self._ping_outstanding:
                self._ping_outstanding = None
                out.append(PingAcknowledged(event.ping_data or b""))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event, out)
        elif isinstance(event, h2.events.PingReceived | h2.events.RemoteSettingsChanged):
            self._unsent_control += 1  # h2 queued the ACK
        # Window updates and settings changes are handled by the flush after every batch; informational
        # responses, trailers, priority and unknown frames mean nothing to a tunnel.

    def _on_request(self, event: h2.events.RequestReceived, out: list[Event]) -> None:
        # Only a server gets here; HboneServer overrides it.
        assert event.stream_id is not None
        self._reset_quietly(event.stream_id, ErrorCode.PROTOCOL_ERROR)

    def _on_response(self, event: h2.events.ResponseReceived, out: list[Event]) -> None:
        assert event.stream_id is not None
        self._reset_quietly(event.stream_id, ErrorCode.PROTOCOL_ERROR)

    def _on_data(self, event: h2.events.DataReceived, out: list[Event]) -> None:
        assert event.stream_id is not None
        sid, data, length = event.stream_id, event.data or b"", event.flow_controlled_length or 0
        stream = self._streams.get(sid)
        if stream is not None and stream.state is StreamState.REJECTED:
            room = self.config.reject_body_limit - len(stream.reject_body)
            stream.reject_body += data[: max(room, 0)]
            if length:
                self._h2.acknowledge_received_data(length, sid)
            return
        if stream is None or stream.state not in RECEIVING_STATES or not data:
            if length:  # nobody will read it: give the window back at once
                self._h2.acknowledge_received_data(length, sid)
            return
        out.append(DataReceived(sid, data, length))

    def _on_stream_ended(self, event: h2.events.StreamEnded, out: list[Event]) -> None:
        assert event.stream_id is not None
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if stream.state is StreamState.REJECTED:
            self._finish_rejection(stream, out)
            return
        stream.advance(StreamInput.REMOTE_END)
        out.append(StreamEnded(stream.id))
        self._forget_if_done(stream)

    def _on_stream_reset(self, event: h2.events.StreamReset, out: list[Event]) -> None:
        assert event.stream_id is not None
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if stream.state is StreamState.REJECTED:
            self._finish_rejection(stream, out)
            return
        if stream.state in PENDING_STATES and not self._is_local_stream(stream.id):
            self._resets.abandoned()  # reset before this side answered: what a rapid reset does
        code = int(event.error_code or 0)
        stream.advance(StreamInput.RESET)
        out.append(StreamReset(stream.id, code, f"reset by peer ({error_name(code)})", by_peer=True))
        self._forget(stream)

    def _finish_rejection(self, stream: TunnelStream, out: list[Event]) -> None:
        if stream.reject_status is not None:
            reason = stream.reject_body.decode("utf-8", "replace").strip()
            out.append(StreamRejected(stream.id, stream.reject_status, reason))
            stream.reject_status = None
        self._reset_quietly(stream.id, ErrorCode.NO_ERROR)
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
        # A graceful GOAWAY: h2 stops everything, but streams the peer took may still finish.
        self._h2.state_machine.state = _H2_OPEN[self._client_side]
        self._state = next_connection_state(self._state, ConnectionInput.GOAWAY_RECEIVED)
        out.append(ConnectionDraining(code, last, by_peer=True))
        for stream in list(self._streams.values()):
            if self._is_local_stream(stream.id) and stream.id > last:
                self._reset_quietly(stream.id, ErrorCode.REFUSED_STREAM)
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

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Queue tunnel bytes; they go out as the peer's windows allow.  Check `can_send()` first: the
        core takes what it is given, and the writer is the one that must wait."""
        stream = self._sending_stream(stream_id)
        if data:
            stream.outbound += data
            self._flush(stream)
            if len(stream.outbound) >= self.config.send_buffer_low_water:
                stream.blocked = True

    def end_stream(self, stream_id: int) -> list[Event]:
        """Half-close: END_STREAM after the queued bytes (the tunnel's FIN).  The events are empty
        unless that finished the last stream of a draining connection (`ConnectionClosed`)."""
        stream = self._sending_stream(stream_id)
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
        self._reset_quietly(stream_id, error_code)
        stream.advance(StreamInput.RESET)
        self._forget(stream)
        return self._drained_events()

    def _drained_events(self) -> list[Event]:
        out: list[Event] = []
        self._check_drained(out)
        return out

    def acknowledge(self, stream_id: int, length: int) -> None:
        """`length` received bytes of `stream_id` were consumed: let the peer send that much more
        (h2 sends a WINDOW_UPDATE only once enough was consumed)."""
        if length > 0 and self._state is not ConnectionState.CLOSED:
            self._h2.acknowledge_received_data(length, stream_id)

    def _sending_stream(self, stream_id: int) -> TunnelStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ProtocolUsageError(f"stream {stream_id} is not an open HBONE tunnel")
        if stream.state not in SENDING_STATES or stream.fin_queued:
            raise ProtocolUsageError(f"stream {stream_id} cannot send while {stream.state.value}")
        if self._state is ConnectionState.CLOSED:
            raise ConnectionNotUsableError("the HBONE connection is closed")
        return stream

    def _flush(self, stream: TunnelStream) -> None:
        """Frame as much of `stream`'s queue as the windows allow."""
        while stream.outbound:
            window = min(self._h2.local_flow_control_window(stream.id), self._h2.max_outbound_frame_size)
            if window <= 0:
                return
            chunk = bytes(stream.outbound[:window])
            del stream.outbound[:window]
            last = stream.fin_queued and not stream.outbound
            self._h2.send_data(stream.id, chunk, end_stream=last)
            if last:
                stream.fin_queued = False
        if stream.fin_queued:
            self._h2.end_stream(stream.id)
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

    def _reset_quietly(self, stream_id: int, error_code: int) -> None:
        # Already closed at the frame level: nothing to abort.
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)

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
        last = self._h2.highest_inbound_stream_id
        self._h2.close_connection(ErrorCode.NO_ERROR, last_stream_id=last)
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
                self._h2.close_connection(code, additional_data=reason.encode("utf-8")[:256])
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
            self._ping_outstanding = payload
            self._ping_deadline = now + self.config.ping_timeout
            self._ping_due = now + self.config.ping_interval
        return out
