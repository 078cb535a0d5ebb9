"""A loopback port for a listener that a child process opens: free when it is chosen, and outside the
kernel's ephemeral range, so that no outgoing connection of another process (a load generator, a test
running beside this one) takes it between the choice and the child's bind."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now, chosen at random below the ephemeral range (or above it,
    if it starts too low to leave room); a port the kernel picks if none of 200 tries is free."""
    low, high = _ephemeral_range()
    span = (LOWEST, low - 1) if low - LOWEST >= 1_000 else (high + 1, 65_535)
    for _ in range(200):
        port = random.randint(*span)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
