"""Listeners for tests of what a connect does when the other side does not answer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unanswered_listener() -> Iterator[tuple[str, int]]:
    """A loopback address that never completes a connection: its listener's accept queue is full (a
    backlog of 0, filled by connects of our own), so the kernel drops the next SYNs and a connect to it
    waits until its caller gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        yield listener.getsockname()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
