"""The waypoint's HTTP/1.1 layer (llhttp): request smuggling shapes and other bad requests get a clear 400
(431 for oversized heads) and never reach an endpoint; framing that is good passes whole (pipelining,
chunked bodies, HEAD, HTTP/1.0, informational answers, bodies that end with the connection)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from waypoint_harness import logged, raw, request, running_proxy, service, start_backend, table, workload

from waypoint.errors import UpstreamReset
from waypoint.http.exchange import iterate
from waypoint.http.http1 import Http1Client
from waypoint.l7.model import RequestHead


def run(fn: Callable[[], Awaitable[None]], limit: float = 15.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()
    trio.run(main)


BAD_REQUESTS = {
    "content-length and transfer-encoding": b"POST /x HTTP/1.1\r\nHost: reviews\r\nContent-Length: 4\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "two different content-lengths": b"POST /x HTTP/1.1\r\nHost: reviews\r\nContent-Length: 3\r\nContent-Length: 40\r\n"
                                     b"\r\nabc",
    "bad chunk size": b"POST /x HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /x HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding not ending in chunked": b"POST /x HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked, gzip"
                                               b"\r\n\r\nabc",
    "space before the colon": b"POST /x HTTP/1.1\r\nHost: reviews\r\nContent-Length : 3\r\n\r\nabc",
    "obsolete line folding": b"GET /x HTTP/1.1\r\nHost: reviews\r\nX-A: one\r\n two\r\n\r\n",
    "bare LF line ends": b"GET /x HTTP/1.1\nHost: reviews\n\n",
    "upgrade with a body": b"POST /x HTTP/1.1\r\nHost: reviews\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
                           b"Content-Length: 26\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "bad header name": b"GET /x HTTP/1.1\r\nHost: reviews\r\nX(a): 1\r\n\r\n",
    "CR inside a header value": b"GET /x HTTP/1.1\r\nHost: reviews\r\nX-A: a\rb\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_400_and_never_reach_the_endpoint(case: str) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (_, front, _log, _n):
                out = await raw(front.port, BAD_REQUESTS[case])
                assert out.startswith(b"HTTP/1.1 400 "), (case, out[:200])
                assert b"connection: close" in out.lower()
                assert out.split(b"\r\n\r\n", 1)[1], "the 400 says what is wrong"
                assert backend.seen == [], (case, backend.seen)
            n.cancel_scope.cancel()
    run(main)


def test_oversized_heads_get_431_whole_or_trickling() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (_, front, _log, _n):  # max_header_bytes=8192 in the harness
                out = await raw(front.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: reviews\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 431 "), out[:100]
                # a header that never ends, sent in pieces: refused once past the limit, not buffered forever
                stream = await trio.open_tcp_stream("127.0.0.1", front.port)
                async with stream:
                    await stream.send_all(b"GET /x HTTP/1.1\r\nHost: reviews\r\nX-Long: ")
                    answer = b""
                    for _ in range(40):
                        try:
                            await stream.send_all(b"b" * 1024)
                        except trio.BrokenResourceError:
                            break
                        with trio.move_on_after(0.05):
                            answer += await stream.receive_some(65536)
                        if answer:
                            break
                    with trio.move_on_after(2):
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
                assert backend.seen == []
            n.cancel_scope.cancel()
    run(main)


def test_endless_trailers_get_431_and_small_ones_pass() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (_, front, _log, _n):
                out = await raw(front.port, b"POST /t HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n"
                                            b"Connection: close\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 200 ") and backend.seen[-1]["body"] == "ok"
                # trailers that never end: refused once past the head limit (8192), not kept
                stream = await trio.open_tcp_stream("127.0.0.1", front.port)
                async with stream:
                    await stream.send_all(b"POST /t HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"2\r\nok\r\n0\r\nX-Long: ")
                    answer = b""
                    for _ in range(40):
                        try:
                            await stream.send_all(b"t" * 1024)
                        except trio.BrokenResourceError:
                            break
                        with trio.move_on_after(0.05):
                            answer += await stream.receive_some(65536)
                        if answer:
                            break
                    with trio.move_on_after(2):
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
            n.cancel_scope.cancel()
    run(main)


def test_pipelined_chunked_head_and_http10_requests_pass_whole() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (_, front, _log, _n):
                # two requests in one write, the first with a chunked body: two answers, in order
                out = await raw(front.port, b"POST /one HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
                                            b"GET /two HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
                assert out.count(b"HTTP/1.1 200 ") == 2, out
                assert [s["path"] for s in backend.seen] == ["/one", "/two"]
                assert backend.seen[0]["body"] == "abcde"
                assert "transfer-encoding" in backend.seen[0]["headers"]  # forwarded chunked (no length known)
                # HEAD: the length of what GET would send, no body, and the connection still usable
                out = await raw(front.port, b"HEAD /h HTTP/1.1\r\nHost: reviews\r\n\r\n"
                                            b"GET /after HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
                first, rest = out.split(b"\r\n\r\n", 1)
                assert first.startswith(b"HTTP/1.1 200 ") and b"content-length: " in first.lower()
                assert rest.startswith(b"HTTP/1.1 200 "), rest[:100]
                # an HTTP/1.0 client without keep-alive: the answer says close, and the connection closes
                out = await raw(front.port, b"GET /old HTTP/1.0\r\nHost: reviews\r\n\r\n")
                head, body = out.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
                assert json.loads(body)["path"] == "/old"
            n.cancel_scope.cancel()
    run(main)


async def _scripted_endpoint(nursery: trio.Nursery, answer: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await answer(stream)
    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _ask(port: int, method: str = "GET") -> tuple[Http1Client, int, bytes]:
    client = Http1Client(await trio.open_tcp_stream("127.0.0.1", port))
    await client.send_request(RequestHead(method, "/", "svc"), iterate(b""))
    head = await client.receive_response()
    body = b"".join([c async for c in client.response_body()])
    return client, head.status, body


def test_client_reads_informational_until_close_and_refuses_malformed_answers() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            async def until_close(s: trio.SocketStream) -> None:
                await s.send_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nall of it")

            client, status, body = await _ask(await _scripted_endpoint(n, until_close))
            assert (status, body) == (200, b"all of it")
            assert not client.reusable  # its end was the connection's
            await client.aclose()

            async def chunked(s: trio.SocketStream) -> None:
                await s.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n")
                await trio.sleep_forever()

            client, status, body = await _ask(await _scripted_endpoint(n, chunked))
            assert (status, body) == (200, b"wxyz") and client.reusable
            await client.aclose()

            async def smuggling(s: trio.SocketStream) -> None:
                await s.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 9\r\n\r\nok")

            with pytest.raises(UpstreamReset, match="malformed"):
                await _ask(await _scripted_endpoint(n, smuggling))

            async def cut(s: trio.SocketStream) -> None:
                await s.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")

            with pytest.raises(UpstreamReset, match="middle of the response"):
                await _ask(await _scripted_endpoint(n, cut))

            async def head_answer(s: trio.SocketStream) -> None:  # a HEAD answer: a length but no body
                await s.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
                await trio.sleep_forever()

            client, status, body = await _ask(await _scripted_endpoint(n, head_answer), "HEAD")
            assert (status, body) == (200, b"") and client.reusable
            await client.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_response_head_is_not_held_back_while_the_body_is_awaited() -> None:
    """The head goes out with the body when both came together; when the body is slow, at once."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            release = trio.Event()

            async def slow_body(s: trio.SocketStream) -> None:
                await s.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
                await release.wait()
                await s.send_all(b"late")

            port = await _scripted_endpoint(n, slow_body)
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", port)], [])
            async with running_proxy(tbl) as (_, front, _log, _n):
                stream = await trio.open_tcp_stream("127.0.0.1", front.port)
                async with stream:
                    await stream.send_all(b"GET /x HTTP/1.1\r\nHost: reviews\r\n\r\n")
                    got = b""
                    while b"\r\n\r\n" not in got:  # (run's limit fails the test if the head never comes)
                        got += await stream.receive_some(65536)
                    assert got.startswith(b"HTTP/1.1 200 ") and not got.endswith(b"late")
                    release.set()
                    while not got.endswith(b"late"):
                        got += await stream.receive_some(65536)
                head, _ = await request(front.port, "/again")  # fast answers still work (head and body together)
                assert head.status == 200
            n.cancel_scope.cancel()
    run(main)


def _request_series(proxy: object) -> dict[tuple[str, str, str], float]:
    """istio_requests_total by (response_code, destination_version, response_flags)."""
    out = {}
    for family in proxy.metrics.registry.collect():  # type: ignore[attr-defined]
        if family.name == "istio_requests":
            for s in family.samples:
                if s.name == "istio_requests_total":
                    key = (s.labels["response_code"], s.labels["destination_version"], s.labels["response_flags"])
                    out[key] = s.value
    return out


def test_metric_labels_follow_status_flags_and_table_changes() -> None:
    """The waypoint keeps the label sets it has built; each request still counts under its own."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            svcs = [service("reviews", "10.96.0.11")]
            async with running_proxy(table(svcs, [workload("reviews-v1", "reviews", "v1", backend.port)], [])) \
                    as (proxy, front, log, _n):
                for path in ("/a", "/status/503", "/b"):
                    await request(front.port, path)
                await logged(log, 3)  # (counted once the response is out)
                assert _request_series(proxy) == {("200", "v1", "-"): 2.0, ("503", "v1", "-"): 1.0}
                # the same workload, now labelled v2: the new table's requests count under v2
                proxy.update(table(svcs, [workload("reviews-v1", "reviews", "v2", backend.port)], [], version=2))
                await request(front.port, "/c")
                await logged(log, 4)
                assert _request_series(proxy)[("200", "v2", "-")] == 1.0
                assert _request_series(proxy)[("200", "v1", "-")] == 2.0
            n.cancel_scope.cancel()
    run(main)
