"""`context.connect_in`: the destination agent's connect to the application, from a socket of the supply
(made in the pod's namespace: here the test's own), on the engine's loop."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvloop

from nodeagent.proxy import context
from nodeagent.proxy.context import connect_in
from nodeagent.proxy.sockets import SocketSupply
from tests.listeners import unanswered_listener

OWN_NETNS = "/proc/self/ns/net"


def run(main: Any) -> None:
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_connect_within_the_node_sets_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect to this host is done within the call: no timeout is set up for a wait that will not
    happen.  One to nowhere is refused (the reset comes after the call: it waits), and one that hangs
    times out with the address in the error."""
    waits: list[float] = []
    real_timeout_at = asyncio.timeout_at

    def counted(when: float) -> Any:
        waits.append(when)
        return real_timeout_at(when)

    monkeypatch.setattr(context.asyncio, "timeout_at", counted)

    async def main() -> None:
        supply = SocketSupply(batch=4)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        sock = await connect_in(supply, OWN_NETNS, ("127.0.0.1", port), 5.0)
        assert sock.getpeername() == ("127.0.0.1", port) and waits == []
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) != 0  # (the supply's mark)
        accepted, peer = listener.accept()
        assert peer == sock.getsockname()
        accepted.close()
        sock.close()

        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
        closed.close()
        with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{free}"):
            await connect_in(supply, OWN_NETNS, ("127.0.0.1", free), 5.0)

        with unanswered_listener() as full:  # the next SYN is dropped: that connect waits, and times out
            await asyncio.sleep(0.05)
            before = len(waits)
            with pytest.raises(TimeoutError, match=r"connecting to 127\.0\.0\.1:\d+ timed out"):
                await connect_in(supply, OWN_NETNS, full, 0.3)
            assert len(waits) == before + 1  # (a connect that waits has its timeout)
        listener.close()
        supply.close()

    run(main)
