"""The bench server's request framing (keep-alive, bodies, Connection: close)."""

from __future__ import annotations

from bench.server import complete_requests, response_bytes


def test_response_has_a_1kib_body() -> None:
    r = response_bytes(1024)
    head, _, body = r.partition(b"\r\n\r\n")
    assert b"Content-Length: 1024" in head and len(body) == 1024


def test_counts_whole_requests_and_keeps_the_rest() -> None:
    buf = bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 3 + b"GET / HT")
    assert complete_requests(buf) == (3, False, False)
    assert buf == bytearray(b"GET / HT")


def test_request_bodies_and_close() -> None:
    buf = bytearray(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
    assert complete_requests(buf) == (0, False, False)
    buf += b"cd"
    assert complete_requests(buf) == (1, True, False)
    assert not buf
