"""HTTP/2 framing facts the HBONE core needs beside `h2`: error codes, the client preface, a guard
that refuses oversized frames and header blocks from their 9-byte headers, the rapid-reset budget, and
the status of a response.  The waypoint's HTTP/2 server uses the same guard and budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h2.errors

ErrorCode = h2.errors.ErrorCodes


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error {code:#x}"



PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
HEADERS, PUSH_PROMISE, CONTINUATION = 0x1, 0x5, 0x9
END_HEADERS = 0x4


@dataclass(frozen=True)
class Violation:
    """A frame the guard refuses: close the connection with `error_code` (GOAWAY), saying `reason`."""

    error_code: int
    reason: str


class FrameGuard:
    """Follows frame boundaries in the received bytes and refuses, as soon as a 9-byte frame header shows
    it, what would make h2 buffer more than we allow:

    - a frame longer than `limit` (FRAME_SIZE_ERROR), so a broken or hostile peer cannot make us
      buffer 16 MiB first;
    - a header block (HEADERS or PUSH_PROMISE and the CONTINUATION frames after it) longer than
      `header_block_limit` bytes in all (ENHANCE_YOUR_CALM).  h2 bounds CONTINUATION frames by number
      only (64), so small frames would let a block grow to 64 of our 1 MiB frames before h2 decodes it.

    Only frame headers are looked at: no per-byte work on DATA."""

    def __init__(self, skip: int, limit: int, header_block_limit: int | None = None) -> None:
        self._skip = skip  # the client preface, which h2 checks itself
        self._limit = limit
        self._block_limit = header_block_limit if header_block_limit is not None else limit
        self._header = bytearray()
        self._body_left = 0
        self._block = 0  # bytes of the header block being received
        self._in_block = False  # a HEADERS/PUSH_PROMISE without END_HEADERS came: CONTINUATION follows

    def check(self, data: bytes) -> Violation | None:
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
                    violation = self._frame(int.from_bytes(self._header[:3], "big"), self._header[3],
                                            self._header[4])
                    self._header.clear()
                    if violation is not None:
                        return violation
        return None

    def _frame(self, length: int, kind: int, flags: int) -> Violation | None:
        if length > self._limit:
            return Violation(ErrorCode.FRAME_SIZE_ERROR,
                             f"peer sent a {length}-byte frame, over the {self._limit}-byte limit: "
                             "is it speaking HTTP/2 (HBONE) at all?")
        self._body_left = length
        if kind in (HEADERS, PUSH_PROMISE):
            self._block = length
        elif kind == CONTINUATION and self._in_block:
            self._block += length
        else:
            return None  # h2 itself refuses a CONTINUATION out of place, or any frame inside a block
        self._in_block = not flags & END_HEADERS
        if self._block > self._block_limit:
            return Violation(ErrorCode.ENHANCE_YOUR_CALM,
                             f"peer sent a header block of over {self._block_limit} bytes "
                             f"({self._block} so far, in HEADERS and CONTINUATION frames)")
        return None


class ResetBudget:
    """Rapid-reset accounting for one connection (CVE-2023-44487).

    Each stream the peer abandons (resets before this side answered it, or sends malformed) costs one,
    each stream this side carries through pays one back; a connection whose debt passes `limit` is
    abusive: close it with GOAWAY ENHANCE_YOUR_CALM.  A client that now and then gives up on a request
    is never near the limit; one that resets streams as fast as it opens them is, after `limit` streams.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.debt = 0

    def abandoned(self) -> None:
        self.debt += 1

    @property
    def exhausted(self) -> bool:
        return self.debt > self.limit

    def carried(self) -> None:
        if self.debt:
            self.debt -= 1

    def reason(self) -> str:
        return (f"peer reset or sent malformed over {self.limit} more streams than it let this side answer "
                "(HTTP/2 rapid reset?)")


def status_of(headers: Sequence[tuple[bytes | str, bytes | str]]) -> int:
    for name, value in headers:
        if name in (b":status", ":status"):
            text = value.decode("ascii") if isinstance(value, bytes) else value
            return int(text) if text.isdigit() else 0
    return 0
