"""The blocking client and the server thread: a Unix socket, loopback TCP, a real network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mesh import netns
from mesh.loopthread import call_on_loop
from mesh.serve import client
from mesh.serve.errors import ListenError, NoAnswer, Unreachable
from mesh.serve.routes import Request, Response, Router
from mesh.serve.server import serve_http
from mesh.serve.thread import ServerThread


def echo(request: Request) -> Response:
    return Response.json({"thread": threading.current_thread().name, "body": request.json(),
                          "type": request.header("content-type")})


ROUTES = Router({"/echo": echo}).add("/echo", echo, methods=("POST",))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with ServerThread("test-http").tcp(ROUTES, "127.0.0.1", 0, name="tcp").unix(ROUTES, tmp_path / "s.sock",
                                                                                  name="unix") as thread:
        port, path = thread.addresses
        assert isinstance(port, int)
        yield port, Path(str(path))
    assert not (tmp_path / "s.sock").exists()


def test_get_and_post_over_a_unix_socket_and_tcp(servers: tuple[int, Path]) -> None:
    port, path = servers
    for endpoint in (client.Endpoint.unix(path), client.Endpoint.tcp("127.0.0.1", port)):
        reply = client.get(endpoint, "/echo")
        assert reply.status == 200 and reply.content_type == "application/json"
        assert reply.json()["body"] == {}
        assert reply.json()["thread"] != "test-http"  # handlers run in worker threads
        posted = client.post_json(endpoint, "/echo", {"a": [1, 2]})
        assert posted.json()["body"] == {"a": [1, 2]} and posted.json()["type"] == "application/json"
        assert client.get(endpoint, "/nope").status == 404


def test_unreachable_and_no_answer(tmp_path: Path) -> None:
    with pytest.raises(Unreachable) as missing:
        client.get(client.Endpoint.unix(tmp_path / "none.sock"), "/")
    assert missing.value.errno == errno.ENOENT and str(tmp_path / "none.sock") in str(missing.value)
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(tmp_path / "mute.sock"))
    mute.listen()

    def hang_up() -> None:
        conn, _ = mute.accept()
        conn.recv(1024)
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(NoAnswer, match="mute.sock did not answer"):
            client.get(client.Endpoint.unix(tmp_path / "mute.sock"), "/")
    finally:
        t.join(5)
        mute.close()


def test_tcp_client_makes_its_socket_inside_the_namespace(servers: tuple[int, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[str] = []

    @contextlib.contextmanager
    def fake_entered(name: str) -> Iterator[None]:
        entered.append(name)
        yield

    monkeypatch.setattr(netns, "entered", fake_entered)
    endpoint = client.Endpoint.tcp("127.0.0.1", servers[0], netns="amb.demo.node.node-1")
    assert client.get(endpoint, "/echo").status == 200
    assert entered == ["amb.demo.node.node-1"] and str(endpoint).endswith(" in amb.demo.node.node-1")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a network namespace")
def test_loopback_of_a_real_namespace() -> None:
    name = f"amb.servetest.{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        ports: list[int] = []
        ready = threading.Event()
        handle: dict[str, object] = {}

        def serve_in_namespace() -> None:  # the whole thread, and so its listener, is in the namespace
            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    handle["cancel"] = nursery.cancel_scope.cancel
                    handle["token"] = trio.lowlevel.current_trio_token()
                    ports.append(await nursery.start(serve_http, ROUTES, "127.0.0.1", 0))
                    ready.set()

            with netns.entered(name):
                trio.run(main)

        thread = threading.Thread(target=serve_in_namespace)
        thread.start()
        assert ready.wait(5)
        try:
            assert client.get(client.Endpoint.tcp("127.0.0.1", ports[0], netns=name), "/echo").status == 200
            with pytest.raises(Unreachable):  # not on the host's own loopback
                client.get(client.Endpoint.tcp("127.0.0.1", ports[0]), "/echo")
        finally:
            handle["token"].run_sync_soon(handle["cancel"])  # type: ignore[attr-defined]
            thread.join(5)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_server_thread_reports_a_port_in_use_and_reads_loop_state(tmp_path: Path) -> None:
    with ServerThread("first").tcp(ROUTES, "127.0.0.1", 0, name="metrics") as first:
        second = ServerThread("second").tcp(ROUTES, "127.0.0.1", int(first.addresses[0]), name="metrics")
        with pytest.raises(ListenError, match=rf"metrics endpoint on 127\.0\.0\.1:{first.addresses[0]}"):
            second.start()

    async def on_a_loop() -> None:
        loop = asyncio.get_running_loop()
        owner = threading.current_thread().name

        def state() -> dict[str, object]:  # state the loop owns, read on the loop's thread
            return {"clients": 3, "read_on": threading.current_thread().name}

        routes = Router({"/state": lambda _: Response.json(call_on_loop(loop, state))})
        with ServerThread("http").unix(routes, tmp_path / "d.sock", name="debug"):
            reply = await asyncio.to_thread(client.get, client.Endpoint.unix(tmp_path / "d.sock"), "/state")
        assert reply.json() == {"clients": 3, "read_on": owner}

    asyncio.run(on_a_loop())
