"""HTTP/2 framing the HBONE core does itself, beside `h2` (which keeps SETTINGS, PING and GOAWAY): error
codes, the client preface, the frames of a stream (DATA, HEADERS and CONTINUATION, RST_STREAM,
WINDOW_UPDATE) read (`FrameReader`) and written, a guard that refuses oversized frames and header blocks
from their 9-byte headers, the rapid-reset budget, and the HPACK encoder of the
header blocks the core sends (`LiteralEncoder`).  The waypoint's HTTP/2 server uses the same guard and
budget."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.errors
import hpack
from hpack.table import HeaderTable

ErrorCode = h2.errors.ErrorCodes


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error {code:#x}"



PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x2, 0x3, 0x5, 0x7, 0x8, 0x9)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY", RST_STREAM: "RST_STREAM", 0x4: "SETTINGS",
          PUSH_PROMISE: "PUSH_PROMISE", 0x6: "PING", GOAWAY: "GOAWAY", WINDOW_UPDATE: "WINDOW_UPDATE",
          CONTINUATION: "CONTINUATION"}
MAX_WINDOW = 2**31 - 1

# The hot path's frames, encoded without h2: a DATA frame is this 9-byte header and the payload as it is.
_HEADER = struct.Struct(">IBI")  # 24-bit length and 8-bit type in one word, flags, stream id
_WINDOW_UPDATE = struct.Struct(">IBII")
_RST_STREAM = _WINDOW_UPDATE  # the same shape: a 4-byte payload (the error code)


def data_header(stream_id: int, length: int, end_stream: bool = False) -> bytes:
    """The 9-byte header of a DATA frame of `length` payload bytes."""
    return _HEADER.pack(length << 8 | DATA, END_STREAM if end_stream else 0, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (stream 0: the connection's window)."""
    return _WINDOW_UPDATE.pack(4 << 8 | WINDOW_UPDATE, 0, stream_id, increment)


def rst_stream(stream_id: int, error_code: int) -> bytes:
    """A RST_STREAM frame."""
    return _RST_STREAM.pack(4 << 8 | RST_STREAM, 0, stream_id, int(error_code))


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as a HEADERS frame, and CONTINUATION frames when it is longer than `max_frame`."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return _HEADER.pack(len(block) << 8 | HEADERS, flags | END_HEADERS, stream_id) + block
    out: list[bytes] = []
    kind = HEADERS
    for start in range(0, len(block), max_frame):
        piece = block[start : start + max_frame]
        last = start + max_frame >= len(block)
        out += (_HEADER.pack(len(piece) << 8 | kind, flags | (END_HEADERS if last else 0), stream_id), piece)
        kind, flags = CONTINUATION, 0
    return b"".join(out)


@dataclass(frozen=True)
class Violation:
    """A frame the guard refuses: close the connection with `error_code` (GOAWAY), saying `reason`."""

    error_code: int
    reason: str


class FrameGuard:
    """Follows frame boundaries in the received bytes and refuses, as soon as a 9-byte frame header shows
    it, what would make the reader (the core's `FrameReader`, or h2 in the waypoint's HTTP/2 server)
    buffer more than we allow:

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
        self._body_left = length
        return self.inspect(length, kind, flags)

    def inspect(self, length: int, kind: int, flags: int) -> Violation | None:
        """Check one frame header (for a caller that splits frames itself, as `FrameReader` does)."""
        if length > self._limit:
            return Violation(ErrorCode.FRAME_SIZE_ERROR,
                             f"peer sent a {length}-byte frame, over the {self._limit}-byte limit: "
                             "is it speaking HTTP/2 (HBONE) at all?")
        if kind in (HEADERS, PUSH_PROMISE):
            self._block = length
        elif kind == CONTINUATION and self._in_block:
            self._block += length
        else:
            return None  # a CONTINUATION out of place, or any frame inside a block: the reader refuses it
        self._in_block = not flags & END_HEADERS
        if self._block > self._block_limit:
            return Violation(ErrorCode.ENHANCE_YOUR_CALM,
                             f"peer sent a header block of over {self._block_limit} bytes "
                             f"({self._block} so far, in HEADERS and CONTINUATION frames)")
        return None


# What a `FrameReader` hands its owner: bytes for h2 (SETTINGS, PING, GOAWAY, PUSH_PROMISE and frames of
# unknown types, in order; a GOAWAY always the last frame of a handing); a piece of a DATA frame's payload
# (stream, payload, window cost: the whole frame's length with its first piece and 0 after, bytes to
# acknowledge once consumed, END_STREAM with the last piece); a WINDOW_UPDATE (stream, increment); a whole
# header block, padding and priority taken out (stream, END_STREAM, the HPACK bytes); a RST_STREAM
# (stream, error code); a violation.  Each returns False to stop reading (the connection is closed).
ToH2 = Callable[[bytes], bool]
OnData = Callable[[int, bytes | memoryview, int, int, bool], bool]
OnWindow = Callable[[int, int], bool]
OnHeaders = Callable[[int, bool, bytes], bool]
OnReset = Callable[[int, int], bool]
OnViolation = Callable[[Violation], None]

_AT_HEADER, _IN_DATA, _IN_OTHER = 0, 1, 2
_FAST_KINDS = frozenset({DATA, WINDOW_UPDATE})
_STREAM_KINDS = frozenset({HEADERS, CONTINUATION, RST_STREAM, PRIORITY})  # read whole, here
_FIXED_SIZE = {WINDOW_UPDATE: 4, RST_STREAM: 4, PRIORITY: 5}
_UNPACK_HEADER = _HEADER.unpack_from
_UNPACK_WORD = struct.Struct(">I").unpack_from


class FrameReader:
    """Splits received bytes at frame boundaries.  The frames of streams are read here: DATA and
    WINDOW_UPDATE from their 9-byte headers, with no copy of a payload that arrived whole; HEADERS and
    CONTINUATION gathered into one header block; RST_STREAM; PRIORITY, which means nothing to a tunnel,
    checked and dropped.  The connection's own frames go to h2 as they came.  DATA payloads are handed on
    as they arrive (a 1 MiB frame need not be buffered first), except padded frames, which are read whole,
    as views of the (immutable) bytes received.  Every frame header passes the `FrameGuard` first, so a
    header block is bounded before it is buffered; inside a block only CONTINUATION frames of its stream
    may come (RFC 9113 6.10).

    A GOAWAY ends the bytes handed to h2 at once: h2 closes its state machine on any GOAWAY and refuses
    every frame after it in the same `receive_data` call as a protocol error, so the owner must see the
    GOAWAY alone, and reopen h2 for a graceful one (`HboneConnection._on_goaway`), before the frames that
    follow it."""

    def __init__(self, guard: FrameGuard, skip: int, to_h2: ToH2, on_data: OnData, on_window: OnWindow,
                 on_headers: OnHeaders, on_reset: OnReset, on_violation: OnViolation) -> None:
        self._guard = guard
        self._skip = skip  # the client preface: h2 checks it
        self._to_h2, self._on_data, self._on_window, self._on_violation = to_h2, on_data, on_window, on_violation
        self._on_headers, self._on_reset = on_headers, on_reset
        self._rest = b""  # an incomplete frame header (or a frame read whole here)
        self._mode = _AT_HEADER
        self._left = 0  # bytes of the current frame body still to come
        self._stream = 0
        self._end = False
        self._first = False  # the next DATA piece is the frame's first: it carries the window cost
        self._length = 0
        self._kind = DATA  # the type of the frame whose body is being read (in _IN_OTHER)
        self._block_stream = 0  # a header block without END_HEADERS yet: its stream, END_STREAM, bytes
        self._block_end = False
        self._block = bytearray()

    def feed(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
            self._rest = b""
        n = len(data)
        i = 0
        run = -1  # where the bytes for h2 not handed over yet start
        guard = self._guard
        view = memoryview(data)  # DATA payloads are handed on as views of `data`: no copy
        while i < n:
            mode = self._mode
            if mode == _IN_DATA:
                take = min(self._left, n - i)
                self._left -= take
                last = not self._left
                piece = data if take == n else view[i : i + take]
                cost = self._length if self._first else 0
                self._first = False
                i += take
                if last:
                    self._mode = _AT_HEADER
                if not self._on_data(self._stream, piece, cost, take, last and self._end):
                    return
                continue
            if mode == _IN_OTHER or self._skip:
                if run < 0:
                    run = i
                if self._skip:
                    take = min(self._skip, n - i)
                    self._skip -= take
                else:
                    take = min(self._left, n - i)
                    self._left -= take
                    if not self._left:
                        self._mode = _AT_HEADER
                        if self._kind == GOAWAY:  # alone to h2, before whatever follows it
                            if not self._to_h2(data[run : i + take]):
                                return
                            run = -1
                i += take
                continue
            if n - i < FRAME_HEADER:
                self._rest = data[i:]
                break
            word, flags, stream = _UNPACK_HEADER(data, i)
            length, kind, stream = word >> 8, word & 0xFF, stream & 0x7FFFFFFF
            violation = guard.inspect(length, kind, flags)
            if violation is None and self._block_stream and (kind != CONTINUATION or stream != self._block_stream):
                violation = Violation(ErrorCode.PROTOCOL_ERROR,
                                      f"peer sent a {_NAMES.get(kind, f'type {kind:#x}')} frame inside the header "
                                      f"block of stream {self._block_stream}, where only its CONTINUATION may come")
            if violation is not None:
                if run >= 0 and not self._to_h2(data[run:i]):
                    return
                self._on_violation(violation)
                return
            if kind not in _FAST_KINDS and kind not in _STREAM_KINDS:
                if run < 0:
                    run = i
                i += FRAME_HEADER
                if length:
                    self._mode, self._left, self._kind = _IN_OTHER, length, kind
                elif kind == GOAWAY:  # malformed (h2 says so), yet still last of its bytes
                    if not self._to_h2(data[run:i]):
                        return
                    run = -1
                continue
            if run >= 0:
                if not self._to_h2(data[run:i]):
                    return
                run = -1
            if kind == DATA:
                end = bool(flags & END_STREAM)
                if flags & PADDED:
                    if n - i < FRAME_HEADER + length:
                        self._rest = data[i:]
                        break
                    pad = data[i + FRAME_HEADER] if length else -1
                    if pad < 0 or pad >= length:
                        self._on_violation(Violation(ErrorCode.PROTOCOL_ERROR,
                                                     "peer sent a DATA frame with more padding than payload"))
                        return
                    payload = view[i + FRAME_HEADER + 1 : i + FRAME_HEADER + length - pad]
                    i += FRAME_HEADER + length
                    if not self._on_data(stream, payload, length, length, end):
                        return
                    continue
                i += FRAME_HEADER
                if not length:
                    if not self._on_data(stream, b"", 0, 0, end):
                        return
                    continue
                self._mode, self._left, self._length = _IN_DATA, length, length
                self._stream, self._end, self._first = stream, end, True
                continue
            size = _FIXED_SIZE.get(kind)
            if size is not None and length != size:
                self._refuse(ErrorCode.FRAME_SIZE_ERROR,
                             f"peer sent a {_NAMES[kind]} of {length} bytes (it has {size})")
                return
            if n - i < FRAME_HEADER + length:  # the other frames of a stream are small: read them whole
                self._rest = data[i:]
                break
            body = data[i + FRAME_HEADER : i + FRAME_HEADER + length]
            i += FRAME_HEADER + length
            if not self._stream_frame(kind, flags, stream, body):
                return
        if run >= 0:
            self._to_h2(data[run:i])

    def _stream_frame(self, kind: int, flags: int, stream: int, body: bytes) -> bool:
        length = len(body)
        if kind == WINDOW_UPDATE:
            return self._on_window(stream, _UNPACK_WORD(body)[0] & 0x7FFFFFFF)
        if kind == RST_STREAM:
            if not stream:
                return self._refuse(ErrorCode.PROTOCOL_ERROR, "peer sent a RST_STREAM on stream 0")
            return self._on_reset(stream, _UNPACK_WORD(body)[0])
        if kind == PRIORITY:  # a tunnel has no priorities: checked, then dropped
            if not stream:
                return self._refuse(ErrorCode.PROTOCOL_ERROR, "peer sent a PRIORITY on stream 0")
            return True
        if kind == CONTINUATION:
            if not self._block_stream:
                return self._refuse(ErrorCode.PROTOCOL_ERROR, "peer sent a CONTINUATION with no header block open")
            self._block += body
            if not flags & END_HEADERS:
                return True
            block, end = bytes(self._block), self._block_end
            self._block_stream, self._block = 0, bytearray()
            return self._on_headers(stream, end, block)
        # HEADERS
        if not stream:
            return self._refuse(ErrorCode.PROTOCOL_ERROR, "peer sent HEADERS on stream 0")
        start, stop = 0, length
        if flags & PADDED:
            pad = body[0] if length else length + 1
            start, stop = 1, length - pad
        if flags & PRIORITY_FLAG:
            start += 5
        if stop < start:
            return self._refuse(ErrorCode.PROTOCOL_ERROR, "peer sent a HEADERS frame with more padding and priority "
                                                          "than payload")
        fragment = body[start:stop] if start or stop != length else body
        if flags & END_HEADERS:
            return self._on_headers(stream, bool(flags & END_STREAM), fragment)
        self._block_stream, self._block_end, self._block = stream, bool(flags & END_STREAM), bytearray(fragment)
        return True

    def _refuse(self, code: int, reason: str) -> bool:
        self._on_violation(Violation(code, reason))
        return False


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


# -- HPACK for the blocks the core sends ---------------------------------------------------------------------

_STATIC_FIELD = {field: i for i, field in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}
_STATIC_NAME = {name: i for i, (name, _) in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}


def _integer(value: int, prefix: int, pattern: int) -> bytes:
    """An HPACK integer with a `prefix`-bit prefix, the first byte's other bits `pattern` (RFC 7541 5.1)."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((pattern | value,))
    out = bytearray((pattern | top,))
    value -= top
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(text: bytes) -> bytes:
    return _integer(len(text), 7, 0) + text  # no Huffman: the block is a few small fields


_STATIC = HeaderTable.STATIC_TABLE


def _read_integer(block: bytes, i: int, mask: int) -> tuple[int, int]:
    """The HPACK integer at `block[i]` whose first byte keeps `mask`'s bits (RFC 7541 5.1), and where
    what follows it starts; (-1, i) when it is cut short or longer than four bytes more."""
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    for shift in (0, 7, 14, 21):
        if i >= len(block):
            return -1, i
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
    return -1, i


def _read_string(block: bytes, i: int) -> tuple[bytes | None, int]:
    """The string literal at `block[i]` (5.2); None when it is Huffman coded or cut short."""
    if i >= len(block) or block[i] & 0x80:
        return None, i
    n = block[i]
    if n < 0x7F:  # (the length in the first byte: a field of the core's is that short)
        i += 1
    else:
        n, i = _read_integer(block, i, 0x7F)
    if n < 0 or i + n > len(block):
        return None, i
    return block[i:i + n], i + n


def decode_plain_block(block: bytes, max_list_size: int) -> list[tuple[bytes, bytes]] | None:
    """The fields of a header block made only of what `LiteralEncoder` writes (static table entries, and
    literals without indexing whose names are static or literal, neither Huffman coded), decoded in one
    pass; None for any other block, which `hpack.Decoder` then decodes whole.  Such a block neither reads
    nor changes the dynamic table, so leaving it out of the decoder keeps the decoder's state the
    peer's.  None too for a block that is cut short, names an index beyond the static table, or lists
    more than `max_list_size` (RFC 7541 4.1 sizes): the decoder then says what is wrong.  The CONNECT
    and its answer between our own agents are such blocks; hpack's decoder makes ~45 Python calls for
    one."""
    out: list[tuple[bytes, bytes]] = []
    size, i, end = 0, 0, len(block)
    while i < end:
        first = block[i]
        if first & 0x80:  # an indexed field (6.1)
            index, i = (first & 0x7F, i + 1) if first != 0xFF else _read_integer(block, i, 0x7F)
            if not 0 < index <= len(_STATIC):  # (0 is an error; a larger one is in the dynamic table)
                return None
            field = _STATIC[index - 1]
        elif first & 0xF0 == 0:  # a literal without indexing (6.2.2): 0000, then a 4-bit name index
            index, i = (first, i + 1) if first != 0x0F else _read_integer(block, i, 0x0F)
            if index < 0 or index > len(_STATIC):
                return None
            name, i = (_STATIC[index - 1][0], i) if index else _read_string(block, i)
            value, i = _read_string(block, i) if name is not None else (None, i)
            if name is None or value is None:
                return None
            field = (name, value)
        else:  # with incremental indexing, never indexed, or a table size update: the decoder's
            return None
        size += 32 + len(field[0]) + len(field[1])
        if size > max_list_size:
            return None
        out.append(field)
    return out


class LiteralEncoder(hpack.Encoder):
    """h2's encoder for the core's own header blocks (a CONNECT, its answer): each field is a static
    table entry when it is one (`:status 200`) and otherwise a literal *without indexing*, not Huffman
    coded (RFC 7541 6.1, 6.2.2), so encoding a block is a few byte joins instead of hpack's table search
    and Huffman pass per field.  The dynamic table is never used, so the peer's decoder state never
    changes; a table size the peer's SETTINGS changed is still announced first, as RFC 7541 4.2 asks.
    The core frames the blocks itself (`headers_frames`); h2 keeps the encoder so that a table size the
    peer's SETTINGS change reaches it.  Names must be lower case and the values well formed: the core
    checks what it is given (`headers.check_regular_headers`)."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        out = []
        if self.table_size_changes:
            out += [_integer(size, 5, 0x20) for size in self.table_size_changes]
            self.table_size_changes = []
        for name, value in headers:
            whole = _STATIC_FIELD_BYTES.get((name, value))
            if whole is not None:
                out.append(whole)
                continue
            named = _NAME_PREFIXES.get(name)
            if named is None:
                index = _STATIC_NAME.get(name)
                named = _integer(index, 4, 0) if index is not None else b"\x00" + _literal(name)
                if len(_NAME_PREFIXES) < _NAME_PREFIXES_KEPT:
                    _NAME_PREFIXES[name] = named
            out.append(named)
            out.append(bytes((len(value),)) + value if len(value) < 0x7F else _literal(value))
        return b"".join(out)


# The encoded forms the encoder reuses: a static field's index byte, and each name's prefix (its static
# index, or the literal name) for the few names the core sends (bounded: names come from our own code).
_STATIC_FIELD_BYTES = {field: _integer(index, 7, 0x80) for field, index in _STATIC_FIELD.items()}
_NAME_PREFIXES: dict[bytes, bytes] = {}
_NAME_PREFIXES_KEPT = 256
