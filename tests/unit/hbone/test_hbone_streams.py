"""The frames of streams as the core reads them itself (HEADERS, CONTINUATION, RST_STREAM), from a peer
that sends what it likes: over the stream limit, on streams never opened, undecodable, malformed answers,
trailers.  Each case ends in what RFC 9113 asks, and what is wrong is said."""

from __future__ import annotations

import hpack
import pytest
from hbone_helpers import of_type

from mesh.hbone.config import HboneConfig
from mesh.hbone.events import (
    ConnectionClosed,
    ConnectRequested,
    Event,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
)
from mesh.hbone.frames import ErrorCode
from mesh.hbone.sides import HboneClient, HboneServer
from mesh.hbone.state import ConnectionState
from tests.security.h2_frames import (
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    Requests,
    frame,
    frames_of,
    goaway_code,
    rst,
    settings,
)


def fed(server: HboneServer, *wire: bytes) -> tuple[list[Event], list[tuple[int, int, int, bytes]]]:
    """What the server makes of `wire`: its events, and the frames it answers with."""
    events = server.receive_data(b"".join(wire))
    return events, frames_of(server.data_to_send())


def a_server(**config: int) -> HboneServer:
    server = HboneServer(HboneConfig(**config))  # type: ignore[arg-type]
    server.data_to_send()
    server.receive_data(PREFACE + settings())
    server.data_to_send()
    return server


def resets(frames: list[tuple[int, int, int, bytes]]) -> dict[int, int]:
    return {sid: int.from_bytes(payload, "big") for kind, _, sid, payload in frames if kind == RST_STREAM}


def test_a_connect_over_the_stream_limit_is_refused_and_the_connection_goes_on() -> None:
    server, req = a_server(max_concurrent_streams=2), Requests()
    events, frames = fed(server, req.connect(1), req.connect(3), req.connect(5))
    assert [e.stream_id for e in of_type(events, ConnectRequested)] == [1, 3]
    assert resets(frames) == {5: ErrorCode.REFUSED_STREAM}
    assert server.state is ConnectionState.OPEN
    events, _ = fed(server, rst(1), req.connect(7))  # one ends: the next fits
    assert [e.stream_id for e in of_type(events, ConnectRequested)] == [7]


def test_headers_on_a_stream_this_side_would_open_close_the_connection() -> None:
    server, req = a_server(), Requests()
    events, frames = fed(server, req.connect(2))
    (closed,) = of_type(events, ConnectionClosed)
    assert closed.error_code == ErrorCode.PROTOCOL_ERROR and "stream 2, which was never opened" in closed.reason
    assert goaway_code(b"".join(frame(k, f, s, p) for k, f, s, p in frames)) == ErrorCode.PROTOCOL_ERROR


def test_headers_on_a_stream_id_already_passed_are_ignored() -> None:
    """Stream 3 is closed once 5 was opened (RFC 9113 5.1.1), and what comes on a closed stream, trailers
    after this side reset it among them, is ignored; its header block is still decoded (HPACK's table)."""
    server, req = a_server(), Requests()
    events, frames = fed(server, req.connect(5), req.connect(3), req.connect(7))
    assert [e.stream_id for e in of_type(events, ConnectRequested)] == [5, 7]
    assert resets(frames) == {}
    assert server.state is ConnectionState.OPEN


def test_an_undecodable_header_block_is_a_compression_error() -> None:
    server = a_server()
    events, _ = fed(server, frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"))  # an index past any table
    (closed,) = of_type(events, ConnectionClosed)
    assert closed.error_code == ErrorCode.COMPRESSION_ERROR and "HPACK" in closed.reason


def test_a_reset_of_a_stream_never_opened_is_a_protocol_error() -> None:
    server = a_server()
    events, _ = fed(server, rst(9))
    (closed,) = of_type(events, ConnectionClosed)
    assert closed.error_code == ErrorCode.PROTOCOL_ERROR and "reset stream 9, which was never opened" in closed.reason


def test_trailers_end_a_tunnel_and_headers_in_its_middle_reset_it() -> None:
    server, req = a_server(), Requests()
    fed(server, req.connect(1), req.connect(3))
    server.accept(1)
    server.accept(3)
    server.data_to_send()
    trailers = req.encoder.encode([("x-done", "1")])
    events, frames = fed(server, frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers),
                         frame(HEADERS, END_HEADERS, 3, req.encoder.encode([("x-more", "1")])))
    assert [e.stream_id for e in of_type(events, StreamEnded)] == [1]
    (reset,) = of_type(events, StreamReset)
    assert reset.stream_id == 3 and not reset.by_peer and "middle of a tunnel" in reset.reason
    assert resets(frames) == {3: ErrorCode.PROTOCOL_ERROR}


def test_a_rejection_resets_only_a_client_that_has_not_ended_its_side() -> None:
    server, req = a_server(), Requests()
    first = req.connect(1)  # encoded in the order sent: HPACK's table carries over
    block = req.encoder.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    fed(server, first, frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
    server.reject(1, 403, "denied")
    server.reject(3, 403, "denied")
    frames = frames_of(server.data_to_send())
    assert resets(frames) == {1: ErrorCode.NO_ERROR}  # stream 3 is closed both ways: no RST_STREAM (RFC 9113 5.1)
    assert [(sid, flags & END_STREAM) for kind, flags, sid, _ in frames if kind == 0] == [(1, 1), (3, 1)]


# -- the client's side: the answers ---------------------------------------------------------------------


def a_client() -> tuple[HboneClient, int, hpack.Encoder]:
    client = HboneClient()
    client.receive_data(settings())
    sid = client.open_stream("10.0.0.1:80")
    client.data_to_send()
    return client, sid, hpack.Encoder()


def answer(encoder: hpack.Encoder, sid: int, fields: list[tuple[str, str]], end: bool = False) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, encoder.encode(fields))


def test_an_informational_answer_is_skipped_and_the_final_one_counts() -> None:
    client, sid, enc = a_client()
    events = client.receive_data(answer(enc, sid, [(":status", "100")]) + answer(enc, sid, [(":status", "200")]))
    assert [(e.stream_id, e.status) for e in of_type(events, StreamAccepted)] == [(sid, 200)]


def test_an_answer_that_ends_the_stream_is_accepted_then_ended_or_rejected_at_once() -> None:
    client, sid, enc = a_client()
    events = client.receive_data(answer(enc, sid, [(":status", "200")], end=True))
    assert [type(e) for e in events] == [StreamAccepted, StreamEnded]
    client, sid, enc = a_client()
    events = client.receive_data(answer(enc, sid, [(":status", "503")], end=True))
    (rejected,) = of_type(events, StreamRejected)
    assert rejected.status == 503 and resets(frames_of(client.data_to_send())) == {sid: ErrorCode.NO_ERROR}


@pytest.mark.parametrize(("fields", "why"), [
    ([(":status", "abc")], "no valid :status"),
    ([], "no valid :status"),
    ([(":status", "200"), (":status", "200")], "two :status"),
    ([(":status", "200"), (":path", "/")], "pseudo-header ':path'"),
    ([("x-a", "1"), (":status", "200")], "a :status after a regular header"),
    ([(":status", "200"), ("X-Up", "1")], "upper-case header name 'X-Up'"),
])
def test_a_malformed_answer_resets_its_stream_only(fields: list[tuple[str, str]], why: str) -> None:
    client, sid, enc = a_client()
    events = client.receive_data(answer(enc, sid, fields))
    (reset,) = of_type(events, StreamReset)
    assert reset.stream_id == sid and not reset.by_peer and why in reset.reason, reset.reason
    assert not of_type(events, StreamAccepted)
    assert resets(frames_of(client.data_to_send())) == {sid: ErrorCode.PROTOCOL_ERROR}
    assert client.state is ConnectionState.OPEN and client.can_open_stream()


def test_a_server_that_opens_a_stream_loses_the_connection() -> None:
    client, _, enc = a_client()
    events = client.receive_data(answer(enc, 2, [(":status", "200")]))
    (closed,) = of_type(events, ConnectionClosed)
    assert closed.error_code == ErrorCode.PROTOCOL_ERROR and "opened stream 2" in closed.reason
