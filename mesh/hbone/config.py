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

    def __post_init__(self) -> None:
        if not 65_535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be between 65535 and 2^31-1")
        if not 65_535 <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be between 65535 and 2^31-1")
        if not 16 * KIB <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be between 16 KiB and 16 MiB - 1")
        if self.ping_interval <= 0 or self.ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
