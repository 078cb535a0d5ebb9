"""The connection and stream state machines, and the pure header functions."""

from __future__ import annotations

import pytest

from mesh.hbone.errors import InvalidAuthorityError, ProtocolUsageError
from mesh.hbone.headers import (
    ConnectRequest,
    Malformed,
    forwarded_value,
    parse_authority,
    parse_connect,
    request_headers,
)
from mesh.hbone.state import (
    RECEIVING_STATES,
    SENDING_STATES,
    ConnectionInput,
    ConnectionState,
    StreamInput,
    StreamState,
    next_connection_state,
    next_stream_state,
)


def test_the_states_hash_by_identity_in_c() -> None:
    """The data path looks states up in sets for every frame: their hash is object's (C), not Enum's
    (a Python function), and lookups still find them."""
    for kind in (ConnectionState, ConnectionInput, StreamState, StreamInput):
        assert kind.__hash__ is object.__hash__
    assert StreamState.OPEN in SENDING_STATES and StreamState.OPEN in RECEIVING_STATES
    assert StreamState.HALF_CLOSED_LOCAL not in SENDING_STATES
    assert StreamState("open") is StreamState.OPEN


def test_stream_lifecycle_both_half_closes() -> None:
    state = StreamState.PENDING
    for event in (StreamInput.ACCEPTED, StreamInput.LOCAL_END, StreamInput.REMOTE_END):
        state = next_stream_state(state, event)
    assert state is StreamState.CLOSED
    state = next_stream_state(StreamState.OPEN, StreamInput.REMOTE_END)
    assert next_stream_state(state, StreamInput.LOCAL_END) is StreamState.CLOSED


def test_stream_end_before_answer() -> None:
    state = next_stream_state(StreamState.PENDING, StreamInput.REMOTE_END)
    assert next_stream_state(state, StreamInput.ACCEPTED) is StreamState.HALF_CLOSED_REMOTE


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (StreamState.PENDING, StreamInput.LOCAL_END),  # no bytes before the answer
        (StreamState.OPEN, StreamInput.ACCEPTED),
        (StreamState.HALF_CLOSED_LOCAL, StreamInput.LOCAL_END),
        (StreamState.CLOSED, StreamInput.RESET),
        (StreamState.RESET, StreamInput.REMOTE_END),
    ],
)
def test_illegal_stream_transitions_are_refused(state: StreamState, event: StreamInput) -> None:
    with pytest.raises(ProtocolUsageError, match="cannot take"):
        next_stream_state(state, event)


def test_connection_lifecycle() -> None:
    state = next_connection_state(ConnectionState.OPEN, ConnectionInput.GOAWAY_RECEIVED)
    assert state is ConnectionState.DRAINING
    assert next_connection_state(state, ConnectionInput.CLOSE) is ConnectionState.CLOSED
    with pytest.raises(ProtocolUsageError):
        next_connection_state(ConnectionState.CLOSED, ConnectionInput.GOAWAY_SENT)


def test_authorities() -> None:
    assert str(parse_authority("10.244.1.5:8080")) == "10.244.1.5:8080"
    assert parse_authority("[fd00::1]:443").host == "fd00::1"
    assert str(parse_authority("[fd00::1]:443")) == "[fd00::1]:443"
    assert parse_authority("reviews.prod.svc.cluster.local:9080").port == 9080
    for bad in ("10.0.0.1", "a:65536", "[zz::1]:80", "bad host:80", ""):
        with pytest.raises(InvalidAuthorityError):
            parse_authority(bad)


def test_forwarded_header() -> None:
    assert forwarded_value("10.0.0.7:4711") == 'for="10.0.0.7:4711"'
    assert forwarded_value("[fd00::7]:4711", host="web.prod") == 'for="[fd00::7]:4711";host=web.prod'
    headers = request_headers(forwarded_for="10.0.0.7:4711", baggage="a=b", extra=[("x-debug", "1")])
    assert headers == [("forwarded", 'for="10.0.0.7:4711"'), ("baggage", "a=b"), ("x-debug", "1")]


def test_parse_connect() -> None:
    request = parse_connect(
        [
            (b":method", b"CONNECT"),
            (b":authority", b"10.0.0.1:80"),
            (b"forwarded", b'for="[fd00::7]:1";host=x'),
        ]
    )
    assert isinstance(request, ConnectRequest)
    assert request.forwarded_for == "[fd00::7]:1" and request.forwarded_host == "x"
    assert isinstance(parse_connect([(b":method", b"CONNECT"), (b":authority", b"\xff:80")]), Malformed)
    dup = parse_connect([(b":method", b"CONNECT"), (b":method", b"CONNECT"), (b":authority", b"a:1")])
    assert isinstance(dup, Malformed) and "twice" in dup.reason
