"""`waypoint.listen.open_listeners`: shared listeners form one SO_REUSEPORT group on a port (the workers'
15008, or a Gateway's listener ports); a listener alone is trio's own and the port stays exclusive."""

from __future__ import annotations

import socket

import pytest
import trio

from waypoint.listen import open_listeners


def test_shared_listeners_take_one_port_and_both_accept() -> None:
    trio.run(_test_shared_listeners_take_one_port_and_both_accept)


async def _test_shared_listeners_take_one_port_and_both_accept() -> None:
    first = await open_listeners(0, "127.0.0.1", shared=True)
    port = first[0].socket.getsockname()[1]
    second = await open_listeners(port, "127.0.0.1", shared=True)
    assert second[0].socket.getsockname()[1] == port
    assert first[0].socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    accepted = {0: 0, 1: 0}

    async def accept(index: int, listener: trio.SocketListener) -> None:
        while True:
            stream = await listener.accept()
            accepted[index] += 1
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept, 0, first[0])
        nursery.start_soon(accept, 1, second[0])
        for _ in range(64):  # the kernel hashes each connection to one of them: 64 leave neither empty
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
        with trio.fail_after(10):
            while sum(accepted.values()) < 64:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert accepted[0] > 0 and accepted[1] > 0, accepted
    for listener in (*first, *second):
        await listener.aclose()


def test_an_unshared_listener_keeps_its_port() -> None:
    trio.run(_test_an_unshared_listener_keeps_its_port)


async def _test_an_unshared_listener_keeps_its_port() -> None:
    alone = await open_listeners(0, "127.0.0.1")
    port = alone[0].socket.getsockname()[1]
    with pytest.raises(OSError):
        await open_listeners(port, "127.0.0.1", shared=True)
    await alone[0].aclose()


def test_a_host_that_does_not_resolve_is_an_error() -> None:
    trio.run(_test_a_host_that_does_not_resolve_is_an_error)


async def _test_a_host_that_does_not_resolve_is_an_error() -> None:
    with pytest.raises(OSError):
        await open_listeners(0, "no-such-host.invalid", shared=True)
