"""The open-loop schedule and the generator's response parsing (no sockets)."""

from __future__ import annotations

import pytest

from bench.loadgen import Schedule, build_request, parse_response


def test_schedule_is_evenly_spaced_at_the_rate() -> None:
    s = Schedule(rate=1000, connections=16, duration=2)
    reqs = list(s.requests())
    assert len(reqs) == s.count == 2000
    offsets = [o for _, _, o in reqs]
    assert offsets[0] == 0
    assert all(b - a in (999_999, 1_000_000, 1_000_001) for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1] == 1_999_000_000


def test_each_connection_gets_every_nth_request_staggered() -> None:
    s = Schedule(rate=1000, connections=16, duration=1)
    on_3 = [o for _, c, o in s.requests() if c == 3]
    assert len(on_3) == 1000 // 16 + (1 if 1000 % 16 > 3 else 0)
    assert on_3[0] == 3_000_000
    assert all(b - a == 16_000_000 for a, b in zip(on_3, on_3[1:], strict=False))


def test_a_share_of_connections_keeps_their_times() -> None:
    s = Schedule(rate=500, connections=4, duration=1)
    share = list(s.requests(frozenset({0, 2})))
    assert {c for _, c, _ in share} == {0, 2}
    assert len(share) == 250
    full = {i: o for i, _, o in s.requests()}
    assert all(full[i] == o for i, _, o in share)


def test_parse_response_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nContent-Length: 10\r\n\r\n"
    buf = bytearray(head + b"01234")
    assert parse_response(buf) is None
    buf += b"56789" + b"HTTP/1.1 5"
    assert parse_response(buf) == (200, len(head) + 10)


def test_parse_response_refuses_what_is_not_http() -> None:
    with pytest.raises(ValueError):
        parse_response(bytearray(b"SSH-2.0-x\r\n\r\n"))
    with pytest.raises(ValueError):
        parse_response(bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))


def test_request_is_plain_http11_keepalive() -> None:
    req = build_request("10.0.0.1:80", "/")
    assert req.startswith(b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n") and req.endswith(b"\r\n\r\n")
    assert b"close" not in req.lower()
