"""A draining waypoint moves its keep-alive clients to new connections, as Envoy's drain does: HTTP/1.1
responses say `Connection: close` and the connection ends after them; HTTP/2 connections get a GOAWAY
(NO_ERROR) that lets everything the client sent so far be served, then the final one naming the last
request, the requests up to it finishing and later ones refused.  The production proxy
(`WaypointProxy`, as `waypoint.app` drains it on SIGTERM) on real sockets, with real clients: the standard
library's keep-alive HTTP/1.1 client and an HTTP/2 client made with h2."""

from __future__ import annotations

import http.client
import json
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import trio
from waypoint_harness import Backend, logged, running_proxy, service, start_backend, table, workload

from waypoint.http.http2 import MAX_STREAM_ID
from waypoint.proxy import WaypointProxy


def run(fn: Callable[[], Awaitable[None]], limit: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()

    trio.run(main)


async def seen(backend: Backend, count: int) -> None:
    """Until the backend has received `count` requests (it records a request before answering it)."""
    while len(backend.seen) < count:
        await trio.sleep(0.005)


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, str | None, bytes]:
    """One request on the client's keep-alive connection (the client reconnects by itself once the server
    has said `Connection: close`): status, the Connection header, the body."""
    conn.request("GET", path, headers={"Host": "reviews"})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, resp.getheader("connection"), body


def test_http1_keep_alive_clients_are_told_to_close_and_reconnect() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (proxy, front, log, _):
                client = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
                slow = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
                try:
                    # Before the drain: keep-alive, two requests on one connection.
                    for _ in range(2):
                        status, connection, _ = await trio.to_thread.run_sync(get, client, "/")
                        assert (status, connection) == (200, None)
                    # A request in flight when the drain begins: its response says close.
                    async with trio.open_nursery() as inner:
                        answers: list[Any] = []

                        async def in_flight() -> None:
                            answers.append(await trio.to_thread.run_sync(get, slow, "/slow/0.3"))

                        inner.start_soon(in_flight)
                        await seen(backend, 3)
                        proxy.drain()
                    assert answers[0][:2] == (200, "close")
                    # The idle keep-alive connection: its next response says close, and the connection ends.
                    status, connection, _ = await trio.to_thread.run_sync(get, client, "/")
                    assert (status, connection) == (200, "close")
                    # The client's next request goes on a new connection (also asked to close: still draining).
                    status, connection, _ = await trio.to_thread.run_sync(get, client, "/")
                    assert (status, connection) == (200, "close")
                    peers = [(await logged(log, i))["downstream_peer"] for i in (1, 2, 4, 5)]
                    assert peers[0] == peers[1] == peers[2] and peers[3] != peers[2], peers
                finally:
                    client.close()
                    slow.close()
            n.cancel_scope.cancel()

    run(main)


def test_a_connection_that_starts_while_draining_is_asked_to_close_from_its_first_response() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (proxy, front, _log, _):
                proxy.drain()
                stream = await trio.open_tcp_stream("127.0.0.1", front.port)
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                out = b""
                while chunk := await stream.receive_some(65536):  # until the waypoint closes
                    out += chunk
                await stream.aclose()
                head = out.split(b"\r\n\r\n", 1)[0].lower()
                assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head
            n.cancel_scope.cancel()

    run(main)


class H2Client:
    """An HTTP/2 client on one connection, made with h2, that keeps reading after a GOAWAY (the streams
    the server will still answer), as a client draining with the server does."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.events: list[h2.events.Event] = []
        self.eof = False

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def get(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "GET"), (":path", path), (":authority", "reviews"),
                                     (":scheme", "http")], end_stream=True)
        await self.flush()
        return sid

    async def until(self, done: Callable[[], bool]) -> None:
        while not done() and not self.eof:
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                break
            for ev in self.conn.receive_data(data):
                self.events.append(ev)
                if isinstance(ev, h2.events.ConnectionTerminated):  # keep the streams below it going
                    self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
                if isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            await self.flush()

    def of(self, kind: type, **match: Any) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())]


def test_http2_clients_get_goaway_the_started_requests_finish_and_later_ones_are_refused() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (proxy, front, _log, _):
                client = H2Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                await client.start()
                first = await client.get("/")
                await client.until(lambda: bool(client.of(h2.events.StreamEnded, stream_id=first)))
                slow = await client.get("/slow/0.3")
                await seen(backend, 2)
                drain(proxy)
                await client.until(lambda: len(client.of(h2.events.ConnectionTerminated)) == 2)
                first, final = client.of(h2.events.ConnectionTerminated)
                assert (first.error_code, first.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, MAX_STREAM_ID)
                assert (final.error_code, final.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, slow)
                late = await client.get("/")  # after the final GOAWAY: refused, safe to send elsewhere
                await client.until(lambda: bool(client.of(h2.events.StreamEnded, stream_id=slow))
                                   and bool(client.of(h2.events.StreamReset, stream_id=late)))
                response = client.of(h2.events.ResponseReceived, stream_id=slow)[0]
                assert dict(response.headers)[":status"] == "200"
                body = b"".join(e.data for e in client.of(h2.events.DataReceived, stream_id=slow))
                assert json.loads(body)["path"] == "/slow/0.3"
                assert client.of(h2.events.StreamReset, stream_id=late)[0].error_code == \
                    h2.errors.ErrorCodes.REFUSED_STREAM
                assert len(backend.seen) == 2  # the refused request never reached the backend
                await client.until(lambda: False)  # nothing left to answer: the waypoint closes the connection
                assert client.eof
                await client.stream.aclose()
            n.cancel_scope.cancel()

    run(main)


def test_an_idle_http2_connection_gets_goaway_and_is_closed() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            tbl = table([service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)], [])
            async with running_proxy(tbl) as (proxy, front, _log, _):
                client = H2Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                await client.start()
                sid = await client.get("/")
                await client.until(lambda: bool(client.of(h2.events.StreamEnded, stream_id=sid)))
                drain(proxy)
                await client.until(lambda: False)
                assert client.eof and client.of(h2.events.ConnectionTerminated)[-1].last_stream_id == sid
                await client.stream.aclose()
            n.cancel_scope.cancel()

    run(main)


def drain(proxy: WaypointProxy) -> None:
    assert not proxy.draining
    proxy.drain()
    assert proxy.draining
