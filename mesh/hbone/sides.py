"""The two sides of the HBONE core: `HboneClient` opens tunnels, `HboneServer` takes them (sans-IO).

The shared machinery (streams, windows, keepalive, GOAWAY) is `mesh.hbone.protocol.HboneConnection`.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.hbone.errors import (
    ConnectionNotUsableError,
    HeaderListTooLargeError,
    ProtocolUsageError,
    StreamLimitError,
)
from mesh.hbone.events import ConnectRequested, Event, RequestRefused, StreamAccepted
from mesh.hbone.frames import ErrorCode, data_header
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

MAX_STREAM_ID = 2**31 - 1


class HboneClient(HboneConnection):
    """The side that opens tunnels (a node agent's outbound, a waypoint towards a destination)."""

    _client_side = True

    def can_open_stream(self) -> bool:
        """Whether `open_stream` may be called (open, and under the peer's stream limit)."""
        if self._state is not ConnectionState.OPEN or self._next_stream_id > MAX_STREAM_ID:
            return False
        return len(self._streams) < self._h2.remote_settings.max_concurrent_streams

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
        limit = self._h2.remote_settings.max_concurrent_streams
        if len(self._streams) >= limit:
            raise StreamLimitError(
                f"the peer allows {limit} concurrent streams and all are in use: open another connection")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise ConnectionNotUsableError("this connection has used all its stream ids: open another one")
        self._next_stream_id += 2
        self._send_headers(stream_id, block)
        self._new_stream(stream_id)
        return stream_id

    def _on_response(self, stream: TunnelStream, end: bool, headers: list[tuple[bytes, bytes]],
                     out: list[Event]) -> None:
        status, problem = _read_answer(headers, end)
        if problem:
            self._stream_error(stream, ErrorCode.PROTOCOL_ERROR, f"peer answered the CONNECT with {problem}")
            return
        if status < 200:
            return  # informational: the answer is still to come
        if status < 300:
            stream.advance(StreamInput.ACCEPTED)
            out.append(StreamAccepted(stream.id, status))
            if end:
                self._remote_end(stream)
            return
        stream.advance(StreamInput.REJECTED)
        stream.reject_status = status
        # The rejection is reported once its body (the reason) has ended; see _finish_rejection.
        if end:
            self._finish_rejection(stream, out)


class HboneServer(HboneConnection):
    """The side that takes tunnels (port 15008 of a pod, a waypoint)."""

    _client_side = False

    def accept(self, stream_id: int) -> None:
        """Answer 200: the upstream is connected; bytes may flow both ways."""
        stream = self._pending_stream(stream_id)
        self._send_headers(stream_id, [(":status", "200")])
        stream.advance(StreamInput.ACCEPTED)
        self._resets.carried()

    def reject(self, stream_id: int, status: int, reason: str = "") -> list[Event]:
        """Answer with a non-2xx `status` (401 denied, 503 upstream unreachable, ...) and `reason` as a
        short text body, then end the stream."""
        if not 300 <= status <= 599:
            raise ProtocolUsageError(f"reject() takes a 3xx-5xx status, not {status}")
        stream = self._pending_stream(stream_id)
        peer_ended = stream.state is StreamState.PENDING_REMOTE_CLOSED
        stream.advance(StreamInput.REJECTED)
        self._respond(stream_id, status, reason, peer_ended)
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

    def _respond(self, stream_id: int, status: int, reason: str, peer_ended: bool) -> None:
        body = reason.encode("utf-8")[: self.config.reject_body_limit]
        headers = [(":status", str(status))]
        if body:
            headers += [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
        self._send_headers(stream_id, headers, end_stream=not body)
        if body:
            stream = self._streams.get(stream_id)
            window = min(stream.send_window if stream is not None else self._peer_stream_window,
                         self._send_window, self._max_send_frame)
            if len(body) <= window:  # the reason, as one DATA frame ending the stream
                self._out += (data_header(stream_id, len(body), end_stream=True), body)
                self._send_window -= len(body)
            else:
                self._out.append(data_header(stream_id, 0, end_stream=True))
        # The answer is complete; tell the client to stop sending without calling it an error (unless
        # it has finished already: the stream is closed both ways then, and takes no RST_STREAM).
        if not peer_ended:
            self._send_reset(stream_id, ErrorCode.NO_ERROR)

    def _on_request(self, stream_id: int, end: bool, headers: list[tuple[bytes, bytes]], out: list[Event]) -> None:
        if self._state is not ConnectionState.OPEN:
            self._send_reset(stream_id, ErrorCode.REFUSED_STREAM)
            return
        if len(self._streams) >= self.config.max_concurrent_streams:  # what our SETTINGS allow
            self._send_reset(stream_id, ErrorCode.REFUSED_STREAM)
            self._resets.abandoned()
            return
        decision = parse_connect(headers)
        if isinstance(decision, Malformed):
            self._respond(stream_id, 400, decision.reason, end)
            out.append(RequestRefused(stream_id, 400, decision.reason))
            self._resets.abandoned()  # checked once the batch is read
            return
        stream = self._new_stream(stream_id)
        out.append(ConnectRequested(stream_id, decision))
        if end:  # a CONNECT that ends its side at once: answered still, then closed when this side ends
            self._remote_end(stream)


def _read_answer(headers: Sequence[tuple[bytes, bytes]], end: bool) -> tuple[int, str]:
    """An answer's status, and what is wrong with its header list ("" if nothing): one 3-digit :status
    and no other pseudo-header, before lower-case regular names; an informational answer does not end
    the stream."""
    status, statuses, regular = 0, 0, False
    for name, value in headers:
        if name.startswith(b":"):
            if name != b":status":
                return 0, f"the pseudo-header {name.decode('ascii', 'replace')!r}"
            if regular:
                return 0, "a :status after a regular header"
            statuses += 1
            status = int(value) if value.isdigit() else 0
        else:
            regular = True
            if name != name.lower():
                return 0, f"the upper-case header name {name.decode('ascii', 'replace')!r}"
    if statuses != 1 or not 100 <= status <= 599:
        return 0, "no valid :status" if statuses <= 1 else "two :status"
    if status < 200 and end:
        return status, f"an informational {status} that ends the stream"
    return status, ""
