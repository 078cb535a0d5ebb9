"""HBONE connection settings (the numbers the design fixes), in one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

from mesh import defaults

KIB = 1024
MIB = 1024 * KIB

HBONE_PORT = defaults.HBONE_PORT


@dataclass(frozen=True)
class HboneConfig:
    """Settings of one side of an HBONE connection.

    Windows are what this side grants its peer (how much it may send before we acknowledge).
    `send_buffer_low_water`: a stream is writable again once fewer bytes than this wait for window.
    """

    stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 1 * MIB
    max_concurrent_streams: int = 200  # what a server allows its peer; a client allows no pushes
    max_header_list_size: int = 16 * KIB
    ping_interval: float = 10.0
    ping_timeout: float = 20.0
    send_buffer_low_water: int = 64 * KIB
    reject_body_limit: int = 1 * KIB  # how much of a rejection's body the client keeps as its reason
    # -- abuse bounds (HTTP/2 rapid reset, CONTINUATION and control-frame floods) ----------------------
    max_reset_streams: int = 100  # streams the peer may abandon beyond those it let us answer (ResetBudget)
    max_unsent_control_frames: int = 1000  # PING/SETTINGS answers queued while the peer reads none (Envoy's)
    answer_timeout: float = 15.0  # client: how long a CONNECT may wait for its answer (the server's
    #                               upstream connect is bounded by its connect timeout, 5 s by default)

    @property
    def max_header_block(self) -> int:
        """Bytes a header block (HEADERS + CONTINUATION) may have on the wire: the decoded limit and room
        for what HPACK and framing add (length prefixes, padding, priority)."""
        return self.max_header_list_size + 1 * KIB

    def __post_init__(self) -> None:
        if not 65_535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be between 65535 and 2^31-1")
        if not 65_535 <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be between 65535 and 2^31-1")
        if not 16 * KIB <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be between 16 KiB and 16 MiB - 1")
        if self.ping_interval <= 0 or self.ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        if self.max_reset_streams < 1 or self.max_unsent_control_frames < 1:
            raise ValueError("max_reset_streams and max_unsent_control_frames must be at least 1")
        if self.answer_timeout <= 0:
            raise ValueError("answer_timeout must be positive")


@dataclass(frozen=True)
class ListenerLimits:
    """Caps of one HBONE listener (a pod's 15008, a waypoint's): connections open at once (more are
    closed as soon as they are accepted) and TLS handshakes in progress at once (more wait, within the
    handshake timeout, for one to finish), so that a flood of connections, or of handshakes that never
    finish, costs a bounded share of the process's descriptors and time."""

    max_connections: int = defaults.HBONE_MAX_CONNECTIONS
    max_handshakes: int = defaults.HBONE_MAX_HANDSHAKES

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_handshakes < 1:
            raise ValueError("max_connections and max_handshakes must be at least 1")
