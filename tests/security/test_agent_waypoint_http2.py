"""HTTP/2 abuse at the waypoint (`waypoint/http/http2.py`, the server side of its HTTP/2): the same holes
as on HBONE, driven by a raw client over a real TCP connection.

- rapid reset: a request's handler is cancelled when the client resets the stream, and a client that
  keeps resetting streams gets GOAWAY ENHANCE_YOUR_CALM;
- CONTINUATION floods: the header block is bounded in bytes, not only in frames;
- PING floods from a client that does not read: the server stops reading (its output is bounded).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from tests.security import h2_frames as h2f
from waypoint.http.exchange import ServerExchange
from waypoint.http.http2 import Http2Server
from waypoint.l7.model import ResponseHead

MAX_HEADER_BYTES = 60 * 1024  # the waypoint's default


def run(fn: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


async def connected(nursery: trio.Nursery, handler: Callable[[ServerExchange], Awaitable[None]]
                    ) -> trio.SocketStream:
    """A raw client connected to an `Http2Server` serving `handler`, preface and SETTINGS sent."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve_one() -> None:
        stream = await listeners[0].accept()
        await Http2Server(stream, MAX_HEADER_BYTES).serve(handler)

    nursery.start_soon(serve_one)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(h2f.PREFACE + h2f.settings())
    return client


async def goaway_within(client: trio.SocketStream, seconds: float) -> int | None:
    """The error code of the first GOAWAY the server sends within `seconds` (None: none came)."""
    received = bytearray()
    with trio.move_on_after(seconds):
        while True:
            try:
                data = await client.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
            code = h2f.goaway_code(bytes(received))
            if code is not None:
                return code
    return h2f.goaway_code(bytes(received))


async def ok(exchange: ServerExchange) -> None:
    await exchange.send_head(ResponseHead(200, (("content-length", "0"),)), end=True)


def test_a_reset_cancels_the_requests_handler() -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def slow(exchange: ServerExchange) -> None:
        started.set()
        try:
            await trio.sleep(30)  # routing, an upstream connect, a retry backoff...
        except trio.Cancelled:
            cancelled.set()
            raise

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, slow)
            await client.send_all(h2f.Requests().get(1))
            await started.wait()
            await client.send_all(h2f.rst(1))
            with trio.move_on_after(2):
                await cancelled.wait()
            assert cancelled.is_set(), "the handler kept running after its stream was reset"
            nursery.cancel_scope.cancel()

    run(main)


def test_rapid_reset_gets_goaway_enhance_your_calm() -> None:
    async def slow(exchange: ServerExchange) -> None:
        await trio.sleep(30)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, slow)
            req = h2f.Requests()
            code = None
            for batch in range(10):
                await client.send_all(b"".join(req.get(2 * i + 1) + h2f.rst(2 * i + 1)
                                               for i in range(batch * 100, batch * 100 + 100)))
                code = await goaway_within(client, 0.05)
                if code is not None:
                    break
            code = code if code is not None else await goaway_within(client, 1)
            assert code == h2f.ENHANCE_YOUR_CALM, f"1000 requests reset at once: GOAWAY {code}"
            nursery.cancel_scope.cancel()

    run(main)


def test_requests_that_complete_are_not_counted_as_abuse() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, ok)
            req = h2f.Requests()
            for i in range(300):  # each answered, and now and then one reset by a client that gave up
                await client.send_all(req.get(4 * i + 1) + req.get(4 * i + 3) + h2f.rst(4 * i + 3))
            assert await goaway_within(client, 1) is None
            nursery.cancel_scope.cancel()

    run(main)


def test_continuation_flood_is_bounded_by_header_block_bytes() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, ok)
            # 200 KiB of header block in 4 KiB frames: 50 frames, under h2's 64-frame limit, so h2 alone
            # would wait for more, holding it all.
            flood = h2f.continuation_flood(1, total=200 * 1024, chunk=4096)
            code = None
            for i in range(0, len(flood), 4096 + 9):  # a frame at a time, looking for the answer between
                try:
                    await client.send_all(flood[i:i + 4096 + 9])
                except trio.BrokenResourceError:
                    break
                code = await goaway_within(client, 0.02)
                if code is not None:
                    break
            code = code if code is not None else await goaway_within(client, 1)
            assert code == h2f.ENHANCE_YOUR_CALM, f"a 200 KiB header block was buffered (GOAWAY {code})"
            nursery.cancel_scope.cancel()

    run(main)


def test_ping_flood_from_a_client_that_does_not_read_is_bounded() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await connected(nursery, ok)
            sent = 0
            with trio.move_on_after(3):
                while True:
                    await client.send_all(b"".join(h2f.ping(n) for n in range(1000)))
                    sent += 17_000
            # The server stopped reading once its answers could not be written: the socket buffers
            # (a few MiB) hold what was sent, not the server's memory.
            assert sent < 64 * 1024 * 1024, f"{sent} bytes of PINGs taken from a client that reads nothing"
            nursery.cancel_scope.cancel()

    run(main)
