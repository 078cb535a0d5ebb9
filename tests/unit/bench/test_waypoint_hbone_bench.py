"""The whole waypoint hop over HBONE (`bench.waypoint_hbone_bench`), on each engine: requests through the
client relay, the hop (mutual TLS and CONNECT in, L7, a tunnel out) and the server relay, answered by the
bench's server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.relay_bench import ROOT, free_port, make_certs, wait_port
from bench.waypoint_bench import VIP
from bench.waypoint_hbone_bench import ENGINES, hbone_table, running_path


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """Certificates and the bench's server (1 KiB answers)."""
    certs = tmp_path_factory.mktemp("certs")
    make_certs(certs)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "server.py"), "--http-port", str(port),
                             "--sink-port", str(free_port())])
    try:
        wait_port(port)
        yield certs, port
    finally:
        proc.kill()
        proc.wait()


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the body"
        body += chunk
    return head, body


def test_the_table_admits_the_vip_and_reaches_its_endpoint_over_hbone() -> None:
    table = hbone_table(8080)
    assert table.refusal(VIP, 80) == ""
    (endpoint,) = table.services["server.bench.svc.cluster.local"].endpoints[80]
    assert endpoint.hbone and endpoint.key == "127.0.0.1:8080"


@pytest.mark.parametrize("engine", ENGINES)
def test_requests_cross_the_hop_on_one_kept_alive_connection(engine: str, backend: tuple[Path, int]) -> None:
    certs, port = backend
    with running_path(engine, certs, port) as (plain, pids):
        with socket.create_connection(("127.0.0.1", plain), timeout=10) as sock:
            for _ in range(2):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                head, body = _answer(sock)
                assert head.startswith(b"HTTP/1.1 200 ") and len(body) == 1024
        assert set(pids) == {"client_relay", "hop", "server_relay"}
