"""Raw HTTP/2 frames for the abuse tests: what a hostile peer writes, byte for byte (RFC 9113 section 4)."""

from __future__ import annotations

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL, ENHANCE_YOUR_CALM = 0x8, 0xB


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def settings() -> bytes:
    return frame(SETTINGS, 0, 0)


def ping(n: int) -> bytes:
    return frame(PING, 0, 0, n.to_bytes(8, "big"))


def rst(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


class Requests:
    """Header blocks from one HPACK encoder (its dynamic table carries over, as on a real connection)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def connect(self, stream_id: int, authority: str = "10.244.2.3:8080") -> bytes:
        block = self.encoder.encode([(":method", "CONNECT"), (":authority", authority)])
        return frame(HEADERS, END_HEADERS, stream_id, block)

    def get(self, stream_id: int, path: str = "/", authority: str = "reviews:9080", *, end: bool = True) -> bytes:
        block = self.encoder.encode([(":method", "GET"), (":scheme", "http"), (":path", path),
                                     (":authority", authority)])
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream_id, block)


def continuation_flood(stream_id: int, total: int, chunk: int = 4096) -> bytes:
    """A HEADERS frame without END_HEADERS and CONTINUATION frames after it, `total` bytes of header block
    in all, never ended: each frame small, the block as large as the peer likes."""
    out = frame(HEADERS, 0, stream_id, b"\x00" * chunk)
    sent = chunk
    while sent < total:
        out += frame(CONTINUATION, 0, stream_id, b"\x00" * chunk)
        sent += chunk
    return out


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in `data` (a server's output, no preface)."""
    out = []
    i = 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        kind, flags = data[i + 3], data[i + 4]
        sid = int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, sid, data[i + 9:i + 9 + length]))
        i += 9 + length
    return out


def goaway_code(data: bytes) -> int | None:
    for kind, _, _, payload in frames_of(data):
        if kind == GOAWAY:
            return int.from_bytes(payload[4:8], "big")
    return None
