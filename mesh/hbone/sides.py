"""The two sides of the HBONE core: `HboneClient` opens tunnels, `HboneServer` takes them (sans-IO).

The shared machinery (streams, windows, keepalive, GOAWAY) is `mesh.hbone.protocol.HboneConnection`.
"""

from __future__ import annotations

from collections.abc import Sequence

import h2.events

from mesh.hbone.errors import (
    ConnectionNotUsableError,
    HeaderListTooLargeError,
    ProtocolUsageError,
    StreamLimitError,
)
from mesh.hbone.events import ConnectRequested, Event, RequestRefused, StreamAccepted
from mesh.hbone.frames import ErrorCode, data_header, status_of
from mesh.hbone.headers import (
    Header,
    Malformed,
    check_regular_headers,
    header_list_size,
    parse_authority,
    parse_connect,
)
from mesh.hbone.protocol import HboneConnection, TunnelStream
from mesh.hbone.state import ConnectionState, StreamInput, StreamState


class HboneClient(HboneConnection):
    """The side that opens tunnels (a node agent's outbound, a waypoint towards a destination)."""

    _client_side = True

    def can_open_stream(self) -> bool:
        """Whether `open_stream` may be called (open, and under the peer's stream limit)."""
        if self._state is not ConnectionState.OPEN:
            return False
        limit = self._h2.remote_settings.max_concurrent_streams
        return self._h2.open_outbound_streams < limit

    def open_stream(self, authority: str, headers: Sequence[Header] = ()) -> int:
        """Send a CONNECT to `authority` ("ip:port") with regular `headers` (see `request_headers`);
        returns the stream id.  The answer comes as `StreamAccepted` or `StreamRejected`."""
        target = parse_authority(authority)
        try:
            check_regular_headers(headers)
        except ValueError as exc:
            raise ProtocolUsageError(str(exc)) from None
        if self._state is not ConnectionState.OPEN:
            raise ConnectionNotUsableError(
                f"connection is {self._state.value}: open the tunnel on another one"
            )
        block = [(":method", "CONNECT"), (":authority", str(target)), *headers]
        limit = self.config.max_header_list_size
        peer_limit = self._h2.remote_settings.max_header_list_size
        if peer_limit is not None:
            limit = min(limit, peer_limit)
        size = header_list_size(block)
        if size > limit:
            raise HeaderListTooLargeError(
                f"CONNECT headers are {size} bytes; the limit is {limit}: send fewer"
            )
        stream_id = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(stream_id, block, end_stream=False)
        except h2.exceptions.TooManyStreamsError:
            raise StreamLimitError(
                f"the peer allows {self._h2.remote_settings.max_concurrent_streams} concurrent streams and "
                "all are in use: open another connection"
            ) from None
        self._take_h2()
        self._new_stream(stream_id)
        return stream_id

    def _on_response(self, event: h2.events.ResponseReceived, out: list[Event]) -> None:
        assert event.stream_id is not None
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.state is not StreamState.PENDING:
            return
        status = status_of(event.headers or [])
        if 200 <= status < 300:
            stream.advance(StreamInput.ACCEPTED)
            out.append(StreamAccepted(stream.id, status))
            return
        stream.advance(StreamInput.REJECTED)
        stream.reject_status = status
        # The rejection is reported once its body (the reason) has ended; see _finish_rejection.


class HboneServer(HboneConnection):
    """The side that takes tunnels (port 15008 of a pod, a waypoint)."""

    _client_side = False

    def accept(self, stream_id: int) -> None:
        """Answer 200: the upstream is connected; bytes may flow both ways."""
        stream = self._pending_stream(stream_id)
        self._h2.send_headers(stream_id, [(":status", "200")], end_stream=False)
        self._take_h2()
        stream.advance(StreamInput.ACCEPTED)
        self._resets.carried()

    def reject(self, stream_id: int, status: int, reason: str = "") -> list[Event]:
        """Answer with a non-2xx `status` (401 denied, 503 upstream unreachable, ...) and `reason` as a
        short text body, then end the stream."""
        if not 300 <= status <= 599:
            raise ProtocolUsageError(f"reject() takes a 3xx-5xx status, not {status}")
        stream = self._pending_stream(stream_id)
        stream.advance(StreamInput.REJECTED)
        self._respond(stream_id, status, reason)
        self._forget(stream)
        return self._drained_events()

    def _pending_stream(self, stream_id: int) -> TunnelStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ProtocolUsageError(f"stream {stream_id} is not a CONNECT waiting for an answer (reset?)")
        if stream.state not in (StreamState.PENDING, StreamState.PENDING_REMOTE_CLOSED):
            raise ProtocolUsageError(f"stream {stream_id} was already answered ({stream.state.value})")
        if self._state is ConnectionState.CLOSED:
            raise ConnectionNotUsableError("the HBONE connection is closed")
        return stream

    def _respond(self, stream_id: int, status: int, reason: str) -> None:
        body = reason.encode("utf-8")[: self.config.reject_body_limit]
        headers = [(":status", str(status))]
        if body:
            headers += [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
        self._h2.send_headers(stream_id, headers, end_stream=not body)
        self._take_h2()
        if body:
            stream = self._streams.get(stream_id)
            window = min(stream.send_window if stream is not None else self._peer_stream_window,
                         self._send_window, self._max_send_frame)
            if len(body) <= window:  # the reason, as one DATA frame ending the stream (h2 learns of
                self._out += (data_header(stream_id, len(body), end_stream=True), body)  # it by the reset)
                self._send_window -= len(body)
            else:
                self._h2.end_stream(stream_id)
                self._take_h2()
        # The answer is complete; tell the client to stop sending without calling it an error.
        self._reset_quietly(stream_id, ErrorCode.NO_ERROR)

    def _on_request(self, event: h2.events.RequestReceived, out: list[Event]) -> None:
        assert event.stream_id is not None
        sid = event.stream_id
        if self._state is not ConnectionState.OPEN:
            self._reset_quietly(sid, ErrorCode.REFUSED_STREAM)
            return
        decision = parse_connect(event.headers or [])
        if isinstance(decision, Malformed):
            self._respond(sid, 400, decision.reason)
            out.append(RequestRefused(sid, 400, decision.reason))
            self._resets.abandoned()  # checked once the batch is read
            return
        self._new_stream(sid)
        out.append(ConnectRequested(sid, decision))
