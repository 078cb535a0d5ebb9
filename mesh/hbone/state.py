"""The two state machines of HBONE: one per connection, one per tunnel stream.

Each is an enum of states, an enum of inputs, and a transition table; a pair missing from a table is a
bug in the caller (`ProtocolUsageError`), never silently ignored.  These sit above h2's own frame-level
state machines: they track what the tunnel means (answered, half-closed which way, rejected, reset).
"""

from __future__ import annotations

from enum import Enum

from mesh.hbone.errors import ProtocolUsageError


class _State(Enum):
    """An enum hashed by identity, in C.  `Enum`'s own `__hash__` is a Python function (the member's
    name hashed), and the data path looks these up in sets and tables for every frame it sends or
    reads.  Members are singletons compared by identity, so the two hashes agree on what is equal."""

    __hash__ = object.__hash__


class ConnectionState(_State):
    OPEN = "open"  # streams may be opened
    DRAINING = "draining"  # a GOAWAY went one way or the other: existing streams finish, no new ones
    CLOSED = "closed"  # nothing more is sent or received


class ConnectionInput(_State):
    GOAWAY_SENT = "goaway sent"
    GOAWAY_RECEIVED = "goaway received"
    FAILED = "failed"  # protocol error, ping timeout, fatal GOAWAY, or the transport went away
    CLOSE = "close"  # closed on purpose


_CONNECTION_TRANSITIONS: dict[tuple[ConnectionState, ConnectionInput], ConnectionState] = {
    (ConnectionState.OPEN, ConnectionInput.GOAWAY_SENT): ConnectionState.DRAINING,
    (ConnectionState.OPEN, ConnectionInput.GOAWAY_RECEIVED): ConnectionState.DRAINING,
    (ConnectionState.OPEN, ConnectionInput.FAILED): ConnectionState.CLOSED,
    (ConnectionState.OPEN, ConnectionInput.CLOSE): ConnectionState.CLOSED,
    (ConnectionState.DRAINING, ConnectionInput.GOAWAY_SENT): ConnectionState.DRAINING,
    (ConnectionState.DRAINING, ConnectionInput.GOAWAY_RECEIVED): ConnectionState.DRAINING,
    (ConnectionState.DRAINING, ConnectionInput.FAILED): ConnectionState.CLOSED,
    (ConnectionState.DRAINING, ConnectionInput.CLOSE): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, ConnectionInput.FAILED): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, ConnectionInput.CLOSE): ConnectionState.CLOSED,
}


def next_connection_state(state: ConnectionState, event: ConnectionInput) -> ConnectionState:
    try:
        return _CONNECTION_TRANSITIONS[(state, event)]
    except KeyError:
        raise ProtocolUsageError(
            f"HBONE connection cannot take {event.value!r} while {state.value}"
        ) from None


class StreamState(_State):
    PENDING = "pending"  # CONNECT sent (client) or received (server), not answered yet
    PENDING_REMOTE_CLOSED = "pending, peer finished sending"  # END_STREAM came before the answer
    OPEN = "open"  # answered 200: bytes both ways
    HALF_CLOSED_LOCAL = "half-closed (local)"  # this side sent END_STREAM (its FIN)
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent END_STREAM
    CLOSED = "closed"  # both sides finished cleanly
    REJECTED = "rejected"  # answered with a non-2xx status
    RESET = "reset"  # RST_STREAM either way, or the connection failed


class StreamInput(_State):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    LOCAL_END = "local end"
    REMOTE_END = "remote end"
    RESET = "reset"


TERMINAL_STREAM_STATES = frozenset({StreamState.CLOSED, StreamState.REJECTED, StreamState.RESET})

_S, _I = StreamState, StreamInput
_STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.PENDING, _I.ACCEPTED): _S.OPEN,
    (_S.PENDING, _I.REJECTED): _S.REJECTED,
    (_S.PENDING, _I.REMOTE_END): _S.PENDING_REMOTE_CLOSED,
    (_S.PENDING, _I.RESET): _S.RESET,
    (_S.PENDING_REMOTE_CLOSED, _I.ACCEPTED): _S.HALF_CLOSED_REMOTE,
    (_S.PENDING_REMOTE_CLOSED, _I.REJECTED): _S.REJECTED,
    (_S.PENDING_REMOTE_CLOSED, _I.RESET): _S.RESET,
    (_S.OPEN, _I.LOCAL_END): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.REMOTE_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.RESET): _S.RESET,
    (_S.HALF_CLOSED_LOCAL, _I.REMOTE_END): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RESET): _S.RESET,
    (_S.HALF_CLOSED_REMOTE, _I.LOCAL_END): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RESET): _S.RESET,
    # A rejection is final once its status is out; its body and the peer's reset change nothing.
    (_S.REJECTED, _I.REMOTE_END): _S.REJECTED,
    (_S.REJECTED, _I.RESET): _S.REJECTED,
}


def next_stream_state(state: StreamState, event: StreamInput) -> StreamState:
    try:
        return _STREAM_TRANSITIONS[(state, event)]
    except KeyError:
        raise ProtocolUsageError(f"HBONE stream cannot take {event.value!r} while {state.value}") from None


# Which states are still waiting for their answer, which let this side send bytes, and which mean the
# peer may still send some.
PENDING_STATES = frozenset({StreamState.PENDING, StreamState.PENDING_REMOTE_CLOSED})
SENDING_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
RECEIVING_STATES = frozenset({StreamState.PENDING, StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
