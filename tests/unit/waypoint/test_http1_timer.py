"""The HTTP/1.1 server's head timeouts: 408 for a head begun and not finished in `header_timeout`, a quiet
close for a keep-alive connection idle for `idle_timeout`, and nothing at all while a request is being
handled (on trio's mock clock: no real waiting)."""

from __future__ import annotations

import trio
import trio.testing

from waypoint.http.exchange import ServerExchange
from waypoint.http.http1 import Http1Server, Http1Settings
from waypoint.l7.model import ResponseHead

SETTINGS = Http1Settings(header_timeout=2.0, idle_timeout=30.0)
GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"


async def _answer(ex: ServerExchange) -> None:
    await ex.send_head(ResponseHead(200, (("content-length", "2"),)))
    await ex.send_data(b"ok")
    await ex.end()


async def _read_until_closed(stream: trio.abc.ReceiveStream) -> tuple[bytes, float]:
    """Everything the server writes until it closes, and the (mock) time of the close."""
    out = b""
    while data := await stream.receive_some(65536):
        out += data
    return out, trio.current_time()


def _run(main: object) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def test_an_idle_keep_alive_connection_is_closed_quietly_after_idle_timeout() -> None:
    async def main() -> None:
        client, server_side = trio.testing.memory_stream_pair()
        server = Http1Server(server_side, SETTINGS)
        async with trio.open_nursery() as n:
            n.start_soon(server.serve, _answer)
            t0 = trio.current_time()
            await client.send_all(GET)
            out, closed_at = await _read_until_closed(client)
        assert out.count(b"HTTP/1.1 200 ") == 1 and b"408" not in out  # the answer, then nothing
        assert 30.0 <= closed_at - t0 < 31.0

    _run(main)


def test_a_second_head_begun_and_not_finished_gets_408_after_header_timeout() -> None:
    async def main() -> None:
        client, server_side = trio.testing.memory_stream_pair()
        server = Http1Server(server_side, SETTINGS)
        async with trio.open_nursery() as n:
            n.start_soon(server.serve, _answer)
            await client.send_all(GET)
            await trio.sleep(10.0)  # idle, within idle_timeout
            t0 = trio.current_time()
            await client.send_all(b"GET /b HTTP/1.1\r\nHo")
            out, closed_at = await _read_until_closed(client)
        assert out.count(b"HTTP/1.1 200 ") == 1 and b"HTTP/1.1 408 " in out
        assert 2.0 <= closed_at - t0 < 4.0  # (the refusal then lingers for what the client still sends)

    _run(main)


def test_a_head_in_pieces_is_served_when_it_completes_in_time() -> None:
    async def main() -> None:
        client, server_side = trio.testing.memory_stream_pair()
        server = Http1Server(server_side, SETTINGS)
        async with trio.open_nursery() as n:
            n.start_soon(server.serve, _answer)
            await trio.sleep(29.0)  # the first byte just inside idle_timeout
            await client.send_all(GET[:5])
            await trio.sleep(1.9)  # the rest just inside header_timeout, past the idle deadline
            await client.send_all(GET[5:])
            out = await client.receive_some(65536)
            assert out.startswith(b"HTTP/1.1 200 ")
            n.cancel_scope.cancel()

    _run(main)


def test_no_head_timeout_cuts_a_request_being_handled() -> None:
    handled: list[str] = []

    async def slow(ex: ServerExchange) -> None:
        await trio.sleep(100.0)  # longer than both timeouts
        handled.append(ex.head.path)
        await _answer(ex)

    async def main() -> None:
        client, server_side = trio.testing.memory_stream_pair()
        server = Http1Server(server_side, SETTINGS)
        async with trio.open_nursery() as n:
            n.start_soon(server.serve, slow)
            await client.send_all(GET)
            await client.send_all(GET.replace(b"/a", b"/b"))  # pipelined: read when the first is done
            out = b""
            while out.count(b"HTTP/1.1 200 ") < 2:
                out += await client.receive_some(65536)
            n.cancel_scope.cancel()
        assert handled == ["/a", "/b"]

    _run(main)
