"""HTTP/2 framing facts the HBONE core needs beside `h2`: error codes, the client preface, a guard
that refuses oversized frames from their 9-byte header, and the status of a response."""

from __future__ import annotations

from collections.abc import Sequence

import h2.errors

ErrorCode = h2.errors.ErrorCodes


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error {code:#x}"



PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9


class FrameGuard:
    """Follows frame boundaries in the received bytes and refuses a frame longer than we allow as soon
    as its 9-byte header is seen, so a broken or hostile peer cannot make us buffer 16 MiB first."""

    def __init__(self, skip: int, limit: int) -> None:
        self._skip = skip  # the client preface, which h2 checks itself
        self._limit = limit
        self._header = bytearray()
        self._body_left = 0

    def check(self, data: bytes) -> str | None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
            elif self._body_left:
                take = min(self._body_left, n - i)
                self._body_left -= take
                i += take
            else:
                take = min(FRAME_HEADER - len(self._header), n - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) == FRAME_HEADER:
                    length = int.from_bytes(self._header[:3], "big")
                    self._header.clear()
                    if length > self._limit:
                        return (
                            f"peer sent a {length}-byte frame, over the {self._limit}-byte limit: "
                            "is it speaking HTTP/2 (HBONE) at all?"
                        )
                    self._body_left = length
        return None


def status_of(headers: Sequence[tuple[bytes | str, bytes | str]]) -> int:
    for name, value in headers:
        if name in (b":status", ":status"):
            text = value.decode("ascii") if isinstance(value, bytes) else value
            return int(text) if text.isdigit() else 0
    return 0
