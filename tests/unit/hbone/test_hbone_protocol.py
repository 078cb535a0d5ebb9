"""The sans-IO HBONE core, scripted: a client object and a server object passing bytes, no sockets."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hbone_helpers import Pair, of_type

from mesh.hbone.config import MIB, HboneConfig
from mesh.hbone.errors import (
    ConnectionNotUsableError,
    HeaderListTooLargeError,
    InvalidAuthorityError,
    ProtocolUsageError,
    StreamLimitError,
)
from mesh.hbone.events import (
    ConnectionClosed,
    ConnectionDraining,
    ConnectRequested,
    DataReceived,
    PingAcknowledged,
    RequestRefused,
    StreamAccepted,
    StreamEnded,
    StreamRejected,
    StreamReset,
    StreamWritable,
)
from mesh.hbone.frames import ErrorCode
from mesh.hbone.headers import request_headers
from mesh.hbone.sides import HboneClient, HboneServer
from mesh.hbone.state import ConnectionState, StreamState


def open_accepted(pair: Pair, authority: str = "10.244.1.5:8080") -> int:
    sid = pair.client.open_stream(authority, request_headers(forwarded_for="10.244.0.7:41234"))
    _, server_events = pair.pump()
    assert [type(e) for e in server_events] == [ConnectRequested]
    pair.server.accept(sid)
    client_events, _ = pair.pump()
    assert client_events == [StreamAccepted(sid)]
    return sid


def received(events: list, stream_id: int) -> bytes:  # type: ignore[type-arg]
    return b"".join(e.data for e in of_type(events, DataReceived) if e.stream_id == stream_id)


def test_accept_carries_the_request_and_data_flows_both_ways() -> None:
    pair = Pair.make()
    headers = request_headers(
        forwarded_for="10.244.0.7:41234",
        service_host="reviews.prod.svc.cluster.local",
        baggage="k=v",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    sid = pair.client.open_stream("10.96.0.20:9080", headers)
    _, server_events = pair.pump()
    (request_event,) = of_type(server_events, ConnectRequested)
    request = request_event.request
    assert str(request.authority) == "10.96.0.20:9080"
    assert request.forwarded_for == "10.244.0.7:41234"
    assert request.forwarded_host == "reviews.prod.svc.cluster.local"
    assert request.header("baggage") == "k=v"
    assert request.header(
        "traceparent",
    ).startswith("00-0af7")  # type: ignore[union-attr]
    assert pair.client.stream_state(sid) is StreamState.PENDING

    pair.server.accept(sid)
    client_events, _ = pair.pump()
    assert client_events == [StreamAccepted(sid)]
    assert pair.server.stream_state(sid) is StreamState.OPEN

    pair.client.send_data(sid, b"ping")
    _, server_events = pair.pump()
    assert received(server_events, sid) == b"ping"
    pair.server.send_data(sid, b"pong")
    client_events, _ = pair.pump()
    assert received(client_events, sid) == b"pong"


def test_client_half_close_then_server_half_close() -> None:
    pair = Pair.make()
    sid = open_accepted(pair)
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    _, server_events = pair.pump()
    assert received(server_events, sid) == b"request"
    assert server_events[-1] == StreamEnded(sid)
    assert pair.client.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert pair.server.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(ProtocolUsageError):
        pair.client.send_data(sid, b"more")  # no bytes after our FIN

    pair.server.send_data(sid, b"response after the client's FIN")
    client_events, _ = pair.pump()
    assert received(client_events, sid) == b"response after the client's FIN"
    pair.server.end_stream(sid)
    client_events, _ = pair.pump()
    assert client_events == [StreamEnded(sid)]
    assert pair.client.active_streams == 0 and pair.server.active_streams == 0


def test_server_half_close_first() -> None:
    pair = Pair.make()
    sid = open_accepted(pair)
    pair.server.send_data(sid, b"banner")
    pair.server.end_stream(sid)
    client_events, _ = pair.pump()
    assert received(client_events, sid) == b"banner" and client_events[-1] == StreamEnded(sid)
    pair.client.send_data(sid, b"still talking")
    pair.client.end_stream(sid)
    _, server_events = pair.pump()
    assert received(server_events, sid) == b"still talking" and server_events[-1] == StreamEnded(sid)
    assert pair.client.active_streams == 0 and pair.server.active_streams == 0


@pytest.mark.parametrize(("status", "reason"), [(401, "denied by policy"), (503, ""), (403, "no")])
def test_reject_reaches_the_client_with_status_and_reason(status: int, reason: str) -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.244.1.5:8080")
    pair.pump()
    pair.server.reject(sid, status, reason)
    client_events, _ = pair.pump()
    assert of_type(client_events, StreamRejected) == [StreamRejected(sid, status, reason)]
    assert pair.client.active_streams == 0 and pair.server.active_streams == 0
    with pytest.raises(ProtocolUsageError):
        pair.server.accept(sid)
    # The connection is fine for the next tunnel.
    assert pair.client.can_open_stream()
    open_accepted(pair)


def test_reject_needs_an_error_status() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.244.1.5:8080")
    pair.pump()
    with pytest.raises(ProtocolUsageError):
        pair.server.reject(sid, 200)


def raw_client() -> h2.connection.H2Connection:
    """A plain h2 client that sends whatever it is told (to produce malformed requests)."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            header_encoding=None,
        )
    )
    conn.initiate_connection()
    return conn


def exchange(raw: h2.connection.H2Connection, server: HboneServer) -> tuple[list, list]:  # type: ignore[type-arg]
    raw_events: list = []  # type: ignore[type-arg]
    server_events: list = []  # type: ignore[type-arg]
    for _ in range(100):
        a, b = raw.data_to_send(), server.data_to_send()
        if not a and not b:
            break
        if a:
            server_events += server.receive_data(a)
        if b:
            raw_events += raw.receive_data(b)
    return raw_events, server_events


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:80")], "not CONNECT"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")], "no :path"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":scheme", "https")], "no :scheme"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1")], "host:port"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:99999")], "port"),
        ([(":method", "CONNECT"), (":authority", "::1:80")], "brackets"),
        ([(":method", "CONNECT")], "no :authority"),
        ([(":authority", "10.0.0.1:80")], "no :method"),
        (
            [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("connection", "close")],
            "connection-specific",
        ),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("Forwarded", "x")], "lower-case"),
        ([(":method", "CONNECT"), ("x", "1"), (":authority", "10.0.0.1:80")], "after a regular header"),
        ([(":method", "CONNECT"), (":protocol", "websocket"), (":authority", "a:1")], "extended CONNECT"),
    ],
)
def test_malformed_requests_get_400_without_reaching_the_application(headers: list, why: str) -> None:  # type: ignore[type-arg]
    raw = raw_client()
    server = HboneServer()
    exchange(raw, server)
    raw.send_headers(1, headers, end_stream=False)
    raw_events, server_events = exchange(raw, server)
    assert not of_type(server_events, ConnectRequested)
    (refused,) = of_type(server_events, RequestRefused)
    assert refused.status == 400 and why in refused.reason
    (response,) = [e for e in raw_events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(response.headers)[b":status"] == b"400"
    body = b"".join(e.data for e in raw_events if isinstance(e, h2.events.DataReceived))
    assert why.encode() in body
    # Only that stream was refused: the connection takes the next request.
    raw.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")], end_stream=False)
    _, server_events = exchange(raw, server)
    assert [type(e) for e in server_events] == [ConnectRequested]
    assert server.state is ConnectionState.OPEN


def test_oversized_request_headers() -> None:
    pair = Pair.make()
    with pytest.raises(HeaderListTooLargeError):
        pair.client.open_stream("10.0.0.1:80", [("x-big", "a" * 20_000)])
    # A peer that ignores our advertised limit loses the connection, and nothing is buffered for it.
    raw = raw_client()
    server = HboneServer()
    exchange(raw, server)
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-big", "a" * 20_000)])
    raw_events, server_events = exchange(raw, server)
    (closed,) = of_type(server_events, ConnectionClosed)
    assert closed.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert not of_type(server_events, ConnectRequested)
    assert server.state is ConnectionState.CLOSED
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in raw_events)


def test_invalid_authority_is_refused_before_anything_is_sent() -> None:
    pair = Pair.make()
    for bad in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:http", "[::1:80", "::1:80", ":80"):
        with pytest.raises(InvalidAuthorityError):
            pair.client.open_stream(bad)
    with pytest.raises(ProtocolUsageError):
        pair.client.open_stream("10.0.0.1:80", [(":path", "/")])
    assert pair.client.data_to_send() == b""
    sid = pair.client.open_stream("[fd00::5]:8080")
    _, server_events = pair.pump()
    (request,) = of_type(server_events, ConnectRequested)
    assert request.request.authority.host == "fd00::5" and sid == 1


def test_reset_by_client_and_by_server() -> None:
    pair = Pair.make()
    a = open_accepted(pair)
    b = open_accepted(pair)
    pair.client.reset(a)
    _, server_events = pair.pump()
    assert server_events == [StreamReset(a, ErrorCode.CANCEL, "reset by peer (CANCEL)", by_peer=True)]
    pair.server.reset(b, ErrorCode.CONNECT_ERROR)
    client_events, _ = pair.pump()
    (reset,) = of_type(client_events, StreamReset)
    assert reset.stream_id == b and reset.error_code == ErrorCode.CONNECT_ERROR and reset.by_peer
    assert pair.client.active_streams == 0 and pair.server.active_streams == 0
    with pytest.raises(ProtocolUsageError):
        pair.client.send_data(b, b"x")


def test_reset_while_pending() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.0.0.1:80")
    pair.pump()
    pair.client.reset(sid)
    _, server_events = pair.pump()
    assert of_type(server_events, StreamReset)
    with pytest.raises(ProtocolUsageError):
        pair.server.accept(sid)


def test_flow_control_over_more_than_both_windows() -> None:
    """20 MiB one way with a reader that acknowledges only what it consumed: the writer is held back
    at the windows, then released, and every byte arrives in order."""
    pair = Pair.make()
    sid = open_accepted(pair)
    payload = bytes(range(256)) * (20 * MIB // 256)
    sent = 0
    got = bytearray()
    writable_events = 0
    blocked_seen = False
    while len(got) < len(payload):
        while sent < len(payload) and pair.client.can_send(sid):
            chunk = payload[sent : sent + 256 * 1024]
            pair.client.send_data(sid, chunk)
            sent += len(chunk)
        if sent < len(payload):
            blocked_seen = True
            assert pair.client.buffered(sid) > 0
        client_events, server_events = pair.pump()
        writable_events += len(of_type(client_events, StreamWritable))
        data_events = of_type(server_events, DataReceived)
        # Without acknowledgements the peer can never have more than the stream window in flight.
        assert sum(e.flow_controlled_length for e in data_events) <= 4 * MIB
        for e in data_events:
            got += e.data
            pair.server.acknowledge(sid, e.flow_controlled_length)
    assert bytes(got) == payload
    assert blocked_seen and writable_events > 0


def test_connection_window_is_shared_by_streams() -> None:
    pair = Pair.make()
    sids = [open_accepted(pair) for _ in range(5)]
    for sid in sids:
        pair.client.send_data(sid, b"x" * (4 * MIB))
    _, server_events = pair.pump()
    # Nothing acknowledged: at most the 16 MiB connection window arrived, over all streams.
    total = sum(e.flow_controlled_length for e in of_type(server_events, DataReceived))
    assert total == 16 * MIB
    assert sum(pair.client.buffered(s) for s in sids) == 4 * MIB


def test_settings_reach_the_peer() -> None:
    pair = Pair.make()
    remote = pair.client._h2.remote_settings
    assert remote.initial_window_size == 4 * MIB
    assert remote.max_frame_size == 1 * MIB
    assert remote.max_concurrent_streams == 200
    assert remote.max_header_list_size == 16 * 1024
    assert pair.server.send_window == 16 * MIB  # the client's connection window


def test_stream_limit_and_reuse() -> None:
    pair = Pair.make()
    sids = []
    for _ in range(200):
        sids.append(pair.client.open_stream("10.0.0.1:80"))
    _, server_events = pair.pump()
    assert len(of_type(server_events, ConnectRequested)) == 200
    assert not pair.client.can_open_stream()
    with pytest.raises(StreamLimitError):
        pair.client.open_stream("10.0.0.1:80")
    for sid in sids:
        pair.server.accept(sid)
    client_events, _ = pair.pump()
    assert len(of_type(client_events, StreamAccepted)) == 200
    pair.client.reset(sids[0])
    pair.pump()
    assert pair.client.can_open_stream()
    sid = pair.client.open_stream("10.0.0.1:80")
    _, server_events = pair.pump()
    assert of_type(server_events, ConnectRequested)[0].stream_id == sid


def test_graceful_goaway_lets_streams_finish() -> None:
    pair = Pair.make()
    sid = open_accepted(pair)
    draining = pair.server.goaway()
    assert draining == [ConnectionDraining(0, sid, by_peer=False)]
    client_events, _ = pair.pump()
    assert client_events == [ConnectionDraining(0, sid, by_peer=True)]
    assert not pair.client.can_open_stream()
    with pytest.raises(ConnectionNotUsableError):
        pair.client.open_stream("10.0.0.1:80")
    # The stream in flight still works both ways and half-closes.
    pair.client.send_data(sid, b"late")
    pair.client.end_stream(sid)
    _, server_events = pair.pump()
    assert received(server_events, sid) == b"late"
    pair.server.send_data(sid, b"answer")
    pair.server.end_stream(sid)
    client_events, server_events = pair.pump()
    assert received(client_events, sid) == b"answer"
    assert of_type(client_events, ConnectionClosed) and pair.client.state is ConnectionState.CLOSED
    assert pair.server.state is ConnectionState.CLOSED


def test_goaway_refuses_streams_the_server_never_took() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.0.0.1:80")  # still in flight when the server says GOAWAY
    pair.server.goaway()
    client_events, server_events = pair.pump()
    assert not of_type(server_events, ConnectRequested)
    (reset,) = of_type(client_events, StreamReset)
    assert reset.stream_id == sid and reset.error_code == ErrorCode.REFUSED_STREAM
    assert "retry" in reset.reason
    assert pair.client.state is ConnectionState.CLOSED


def test_answers_read_in_one_go_with_a_graceful_goaway_still_arrive() -> None:
    """A draining server answers the CONNECTs it took before its GOAWAY, and goes on relaying the open
    tunnels; a busy client reads all of it at once.  h2 alone refuses every frame after a GOAWAY in the
    same read, which used to close the connection (PROTOCOL_ERROR) with every tunnel on it, during each
    node agent restart under load."""
    pair = Pair.make()
    long_lived = open_accepted(pair)
    pending = pair.client.open_stream("10.244.1.5:8080", request_headers(forwarded_for="10.244.0.7:41236"))
    _, server_events = pair.pump()
    assert [e.stream_id for e in of_type(server_events, ConnectRequested)] == [pending]
    pair.server.goaway()
    pair.server.accept(pending)  # its upstream connected after the GOAWAY went out
    pair.server.send_data(long_lived, b"still here")
    client_events = pair.client.receive_data(pair.server.data_to_send())  # one read: GOAWAY, HEADERS, DATA
    assert not of_type(client_events, ConnectionClosed) and not of_type(client_events, StreamReset)
    assert of_type(client_events, ConnectionDraining) == [ConnectionDraining(0, pending, by_peer=True)]
    assert StreamAccepted(pending) in client_events
    assert received(client_events, long_lived) == b"still here"
    # Both tunnels work on until they end; then the connection closes cleanly.
    for sid in (pending, long_lived):
        pair.client.send_data(sid, b"bye")
        pair.client.end_stream(sid)
        pair.server.end_stream(sid)
    client_events, server_events = pair.pump()
    assert received(server_events, pending) == received(server_events, long_lived) == b"bye"
    (closed,) = of_type(client_events, ConnectionClosed)
    assert closed.error_code == ErrorCode.NO_ERROR and pair.client.state is ConnectionState.CLOSED


def test_fatal_goaway_resets_everything() -> None:
    pair = Pair.make()
    sid = open_accepted(pair)
    events = pair.server.close(ErrorCode.INTERNAL_ERROR, "shutting down")
    assert of_type(events, StreamReset) and of_type(events, ConnectionClosed)
    client_events, _ = pair.pump()
    (reset,) = of_type(client_events, StreamReset)
    (closed,) = of_type(client_events, ConnectionClosed)
    assert reset.stream_id == sid and "shutting down" in closed.reason and closed.by_peer


def test_keepalive_ping_and_ack() -> None:
    client = HboneClient(HboneConfig(), now=100.0)
    server = HboneServer()
    pair = Pair(client, server)
    pair.pump()
    assert client.next_deadline() == 110.0
    assert client.on_timer(105.0) == [] and client.data_to_send() == b""
    client.on_timer(110.0)
    assert client.next_deadline() == 130.0  # the answer is due within 20 s
    client_events, _ = pair.pump()
    assert of_type(client_events, PingAcknowledged)
    assert client.next_deadline() == 120.0


def test_ping_timeout_closes_the_connection() -> None:
    client = HboneClient(HboneConfig(), now=0.0)
    server = HboneServer()
    pair = Pair(client, server)
    pair.pump()
    sid = open_accepted(pair)
    client.on_timer(10.0)
    client.data_to_send()  # the PING is lost: the server never answers
    assert client.on_timer(29.9) == []
    events = client.on_timer(30.0)
    (closed,) = of_type(events, ConnectionClosed)
    assert "PING" in closed.reason and not closed.by_peer
    assert of_type(events, StreamReset)[0].stream_id == sid
    assert client.state is ConnectionState.CLOSED and client.next_deadline() is None
    with pytest.raises(ConnectionNotUsableError):
        client.open_stream("10.0.0.1:80")


def test_garbage_from_the_peer_closes_the_connection() -> None:
    client = HboneClient()
    events = client.receive_data(b"this is not HTTP/2 at all, not even close........")
    (closed,) = of_type(events, ConnectionClosed)
    assert closed.error_code == ErrorCode.FRAME_SIZE_ERROR and "HTTP/2" in closed.reason
    assert client.state is ConnectionState.CLOSED
    server = HboneServer()
    (closed,) = of_type(server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ConnectionClosed)
    assert closed.error_code == ErrorCode.PROTOCOL_ERROR


def test_early_data_goes_before_the_answer_and_only_from_the_client() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.0.0.1:80")
    pair.client.send_data(sid, b"early")  # early data: with the HEADERS, before the 200
    _, server_events = pair.pump()
    assert of_type(server_events, ConnectRequested) and received(server_events, sid) == b"early"
    assert pair.client.stream_state(sid) is StreamState.PENDING
    with pytest.raises(ProtocolUsageError):
        pair.client.end_stream(sid)  # END_STREAM waits for the answer
    with pytest.raises(ProtocolUsageError):
        pair.server.send_data(sid, b"early")  # the server answers first
    pair.server.accept(sid)
    client_events, _ = pair.pump()
    assert client_events == [StreamAccepted(sid)]
    pair.client.send_data(sid, b" then more")
    pair.client.end_stream(sid)
    _, server_events = pair.pump()
    assert received(server_events, sid) == b" then more" and of_type(server_events, StreamEnded)


def test_early_data_on_a_refused_connect_is_dropped_and_its_window_given_back() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.0.0.1:80")
    pair.client.send_data(sid, b"x" * 1000)
    _, server_events = pair.pump()
    (data,) = of_type(server_events, DataReceived)
    events = pair.server.reject(sid, 401, "denied")
    assert not of_type(events, DataReceived)
    pair.server.acknowledge(sid, data.flow_controlled_length)  # what the engine does with what it held
    client_events, _ = pair.pump()
    (rejected,) = of_type(client_events, StreamRejected)
    assert rejected.status == 401
    assert pair.server._recv_window + pair.server._consumed == pair.server.config.connection_window
