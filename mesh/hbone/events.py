"""What the HBONE protocol core reports after taking bytes or a timer tick (plain frozen values)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.hbone.headers import ConnectRequest


@dataclass(frozen=True)
class StreamAccepted:
    """Client: the server answered the CONNECT with 2xx; the tunnel is open."""

    stream_id: int
    status: int = 200


@dataclass(frozen=True)
class StreamRejected:
    """Client: the server answered the CONNECT with `status`; `reason` is its body, if it sent one."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True)
class ConnectRequested:
    """Server: a well-formed CONNECT arrived; answer it with `accept()` or `reject()`."""

    stream_id: int
    request: ConnectRequest


@dataclass(frozen=True)
class RequestRefused:
    """Server: a CONNECT was answered by the core itself (malformed: 400; draining: refused)."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True)
class DataReceived:
    """Tunnel bytes from the peer.  Call `acknowledge(stream_id, flow_controlled_length)` once they are
    consumed, so the peer's window reopens."""

    stream_id: int
    data: bytes | memoryview  # a view of the bytes received, when the frame did not arrive alone
    flow_controlled_length: int


@dataclass(frozen=True)
class StreamEnded:
    """The peer finished sending on this tunnel (END_STREAM: its FIN)."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    """The tunnel is gone: reset by the peer (`by_peer`) or because its connection failed."""

    stream_id: int
    error_code: int
    reason: str
    by_peer: bool


@dataclass(frozen=True)
class StreamWritable:
    """Enough buffered bytes went out that `can_send(stream_id)` is true again."""

    stream_id: int


@dataclass(frozen=True)
class ConnectionDraining:
    """A GOAWAY went out or came in: streams up to `last_stream_id` may finish, nothing new starts."""

    error_code: int
    last_stream_id: int
    by_peer: bool


@dataclass(frozen=True)
class ConnectionClosed:
    """The connection is finished: send what `data_to_send()` still holds, then close the transport."""

    error_code: int
    reason: str
    by_peer: bool


@dataclass(frozen=True)
class PingAcknowledged:
    payload: bytes


Event = (
    StreamAccepted
    | StreamRejected
    | ConnectRequested
    | RequestRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamWritable
    | ConnectionDraining
    | ConnectionClosed
    | PingAcknowledged
)
