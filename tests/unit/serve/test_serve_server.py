"""The trio + h11 server on real sockets: loopback TCP and a Unix socket."""

from __future__ import annotations

import json
import stat
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from mesh.serve.endpoints import Readiness, metrics_handler, readiness_handler
from mesh.serve.errors import ListenError
from mesh.serve.routes import Request, Response, Router
from mesh.serve.server import serve_http, serve_unix


def echo(request: Request) -> Response:
    return Response.json({"method": request.method, "query": dict(request.query), "local": request.local,
                          "body": request.body.decode()})


def app(checks: dict[str, bool]) -> Router:
    reg = CollectorRegistry()
    Counter("served", "x", registry=reg).inc(5)
    router = Router().include(metrics_handler(reg)).include(readiness_handler(lambda: Readiness.from_checks(checks)))
    return router.add("/echo", echo, methods=("GET", "POST"))


def run_tcp(test: Callable[[int], Awaitable[None]], handler: Router, max_body: int = 64 * 1024) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0, max_body=max_body))
            with trio.fail_after(10):
                await test(port)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    out = []
    while chunk := await stream.receive_some(65536):
        out.append(chunk)
    await stream.aclose()
    return b"".join(out)


def split(reply: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def test_routes_404_405_and_keep_alive() -> None:
    async def check(port: int) -> None:
        reply = await exchange(port, b"GET /echo?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
                                     b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # never answered: 405 closed
        answers = reply.split(b"HTTP/1.1 ")[1:]
        assert [a[:3] for a in answers] == [b"200", b"404", b"405"]
        assert b'"query": {\n  "a": "1"\n }' in answers[0] and b'"local": true' in answers[0]
        assert b"no endpoint /nope: try /metrics, /stats/prometheus, /healthz/ready, /echo" in answers[1]
        assert b"allow: GET, POST" in answers[2] and b"connection: close" in answers[2]

    run_tcp(check, app({}))


def test_post_body_reaches_the_handler_and_large_bodies_are_refused() -> None:
    async def check(port: int) -> None:
        status, _, body = split(await exchange(
            port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"))
        assert status == 200 and json.loads(body)["body"] == "hello"
        chunked = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n")
        assert json.loads(split(await exchange(port, chunked))[2])["body"] == "helloworld"
        too_big = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n" + b"x" * 65
        assert split(await exchange(port, too_big))[0] == 413
        chunked_big = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"40\r\n" + b"x" * 64 + b"\r\n40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
        assert split(await exchange(port, chunked_big))[0] == 413

    run_tcp(check, app({}), max_body=64)


def test_bad_request_bytes_get_400_and_the_server_keeps_serving() -> None:
    async def check(port: int) -> None:
        for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GET\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
                        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", b"\x00" * 100 + b"\r\n\r\n"):
            assert split(await exchange(port, garbage))[0] == 400, garbage
        gone = await trio.open_tcp_stream("127.0.0.1", port)
        await gone.send_all(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")  # and away
        await gone.aclose()
        assert split(await exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[0] == 200

    run_tcp(check, app({}))


def test_metrics_and_readiness_over_http() -> None:
    checks = {"discovery": False}

    async def check(port: int) -> None:
        status, head, body = split(await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert status == 200 and b"content-type: text/plain; version=" in head and b"served_total 5.0" in body
        ready = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert split(await exchange(port, ready))[::2] == (503, b"not ready: waiting for discovery\n")
        checks["discovery"] = True
        assert split(await exchange(port, ready))[::2] == (200, b"ready\n")

    run_tcp(check, app(checks))


def test_unix_socket_mode_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "run" / "debug.sock"
    path.parent.mkdir()
    path.write_text("left by a process that died")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve_unix, app({}), path, name="debug"))
            assert bound == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o600
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
            assert json.loads(split(reply)[2])["local"] is True
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not path.exists()


def test_cannot_listen_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    async def main() -> None:
        with pytest.raises(ListenError, match=r"cannot listen for the api endpoint on .*/file/api\.sock"):
            await serve_unix(app({}), tmp_path / "file" / "api.sock", name="api")

    trio.run(main)


def test_a_successor_sharing_the_port_answers_once_it_listens() -> None:
    """`reuse_port`: a node agent started beside the one it replaces takes its endpoints over (the probe
    sees the new one's readiness), and has them alone once the old one is gone."""

    def says(text: str, status: int = 200) -> Router:
        return Router({"/healthz/ready": lambda _: Response.text(text, status)})

    async def get(port: int) -> tuple[int, bytes]:
        status, _, body = split(await exchange(port, b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"))
        return status, body

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            old = trio.CancelScope()

            async def serve_old(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
                with old:
                    await serve_http(says("ready"), "127.0.0.1", 0, reuse_port=True, task_status=task_status)

            port = await nursery.start(serve_old)
            assert await get(port) == (200, b"ready\n")
            await nursery.start(partial(serve_http, says("starting", 503), "127.0.0.1", port, reuse_port=True))
            for _ in range(10):
                assert await get(port) == (503, b"starting\n")
            old.cancel()
            await trio.sleep(0.05)
            assert await get(port) == (503, b"starting\n")
            nursery.cancel_scope.cancel()

    trio.run(main)
