"""Protocol detection from the first bytes of a tunnel."""

from __future__ import annotations

from waypoint.http.detect import Protocol, sniff
from waypoint.http.http2 import PREFACE


def test_sniff() -> None:
    assert sniff(b"") is Protocol.UNDECIDED
    assert sniff(b"GE") is Protocol.UNDECIDED
    assert sniff(b"GET ") is Protocol.HTTP1
    assert sniff(b"POST /x HTTP/1.1") is Protocol.HTTP1
    assert sniff(PREFACE[:10]) is Protocol.UNDECIDED
    assert sniff(PREFACE) is Protocol.HTTP2
    assert sniff(b"\x16\x03\x01") is Protocol.OPAQUE
    assert sniff(b"GETX") is Protocol.OPAQUE
    assert sniff(b"SSH-2.0") is Protocol.OPAQUE
