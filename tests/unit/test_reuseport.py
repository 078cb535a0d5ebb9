"""`mesh.reuseport`: a listening port that a node agent and its successor share, for real on this kernel."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import netns, reuseport

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another socket owner, a network namespace)")


def listener(port: int = 0, *, newest: bool = True) -> socket.socket:
    sock = socket.socket()
    reuseport.share(sock)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    if newest:
        reuseport.prefer_newest(sock)
    sock.setblocking(False)
    return sock


def accepted(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def test_the_successor_takes_every_new_connection_once_it_listens() -> None:
    old = listener()
    port = old.getsockname()[1]
    clients = connect(port, 10)
    assert accepted(old) == 10
    new = listener(port)
    clients += connect(port, 20)
    assert (accepted(old), accepted(new)) == (0, 20)
    old.close()  # the old one is gone: the successor is alone, and takes them all
    clients += connect(port, 10)
    assert accepted(new) == 10
    newer = listener(port)  # the next restart: the group's program outlived the listener that set it
    clients += connect(port, 10)
    assert (accepted(new), accepted(newer)) == (0, 10)
    for sock in [*clients, new, newer]:
        sock.close()


def test_a_listener_without_the_program_still_joins_and_gets_it_from_the_group() -> None:
    old = listener()
    port = old.getsockname()[1]
    new = listener(port, newest=False)
    clients = connect(port, 10)
    assert (accepted(old), accepted(new)) == (0, 10)
    for sock in [*clients, old, new]:
        sock.close()


@needs_root
def test_a_socket_of_another_owner_cannot_share_the_port(tmp_path: Path) -> None:
    with reuseport.owned_by(1337):
        first = socket.socket()
    reuseport.share(first)
    first.bind(("127.0.0.1", 0))
    first.listen(8)
    port = first.getsockname()[1]
    intruder = socket.socket()  # root, and asking to share: still refused
    reuseport.share(intruder)
    with pytest.raises(OSError) as refused:
        intruder.bind(("127.0.0.1", port))
    assert refused.value.errno == 98  # EADDRINUSE
    with reuseport.owned_by(1337):
        successor = socket.socket()
    reuseport.share(successor)
    successor.bind(("127.0.0.1", port))
    for sock in (first, intruder, successor):
        sock.close()
    made = tmp_path / "after"
    made.write_text("")
    assert made.stat().st_uid == 0  # the thread makes files (and sockets) as root again


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    name = f"t-reuseport-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@needs_root
def test_connections_queued_on_a_listener_that_closes_move_to_its_successor(scratch_netns: str) -> None:
    reuseport.migrate_requests(scratch_netns)

    def in_netns(port: int = 0) -> socket.socket:
        with netns.entered(scratch_netns):
            sock = socket.socket()
        reuseport.share(sock)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    old = in_netns()
    port = old.getsockname()[1]
    new = in_netns(port)  # no program: the kernel's hash spreads connections over both
    clients = []
    for i in range(40):
        with netns.entered(scratch_netns):
            client = socket.socket()
        client.connect(("127.0.0.1", port))
        client.sendall(b"%02d" % i)
        clients.append(client)
    old.close()  # with connections waiting in its queue
    new.settimeout(1.0)
    got = []
    for _ in clients:
        conn, _ = new.accept()
        got.append(conn.recv(2))
        conn.close()
    assert sorted(got) == [b"%02d" % i for i in range(40)]  # none was reset: they all reached the successor
    for sock in [*clients, new]:
        sock.close()
