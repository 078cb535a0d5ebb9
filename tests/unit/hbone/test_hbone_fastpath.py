"""The frames of streams, which the core reads and writes without h2 (DATA, WINDOW_UPDATE, HEADERS and
CONTINUATION, RST_STREAM, PRIORITY), and flow control.

Bytes are fed as a hostile or clumsy peer would send them: split anywhere, padded, on streams that do
not exist, over the windows."""

from __future__ import annotations

import pytest
from hbone_helpers import Pair, of_type

from mesh.hbone.config import HboneConfig
from mesh.hbone.events import (
    ConnectionClosed,
    ConnectRequested,
    DataReceived,
    StreamAccepted,
    StreamEnded,
    StreamReset,
)
from mesh.hbone.frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    ErrorCode,
    FrameGuard,
    FrameReader,
    LiteralEncoder,
    Violation,
    data_header,
    decode_plain_block,
    headers_frames,
    window_update,
)
from mesh.hbone.sides import HboneServer
from tests.security import h2_frames as h2f


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return h2f.frame(kind, flags, stream_id, payload)


def open_server(config: HboneConfig | None = None) -> tuple[HboneServer, h2f.Requests]:
    server = HboneServer(config)
    server.data_to_send()
    server.receive_data(h2f.PREFACE + h2f.settings())
    server.data_to_send()
    requests = h2f.Requests()
    events = server.receive_data(requests.connect(1))
    assert of_type(events, ConnectRequested)
    server.accept(1)
    server.data_to_send()
    return server, requests


def closed_with(events: list, code: int) -> bool:
    return any(isinstance(e, ConnectionClosed) and e.error_code == code for e in events)


def test_encoded_frames_are_what_h2_would_write() -> None:
    assert data_header(3, 5, end_stream=True) == frame(DATA, END_STREAM, 3, b"hello")[:9]
    assert window_update(0, 65535) == frame(0x8, 0, 0, (65535).to_bytes(4, "big"))


def test_the_reader_splits_at_every_byte_boundary() -> None:
    got: list[tuple[str, object]] = []

    def to_h2(b: bytes) -> bool:
        got.append(("h2", bytes(b)))
        return True

    def on_data(sid: int, data: object, cost: int, length: int, end: bool) -> bool:
        got.append(("data", (sid, bytes(data), cost, length, end)))  # type: ignore[arg-type]
        return True

    def on_window(sid: int, inc: int) -> bool:
        got.append(("window", (sid, inc)))
        return True

    def on_headers(sid: int, end: bool, block: bytes) -> bool:
        got.append(("headers", (sid, end, bytes(block))))
        return True

    def on_reset(sid: int, code: int) -> bool:
        got.append(("reset", (sid, code)))
        return True

    # A header block in a padded HEADERS frame with a priority, and a CONTINUATION; a PRIORITY frame
    # (dropped); DATA, WINDOW_UPDATE and RST_STREAM; SETTINGS and PING for h2.
    headers = frame(HEADERS, PADDED | PRIORITY_FLAG | END_STREAM, 3, b"\x02" + bytes(5) + b"abc" + b"\0\0")
    wire = (frame(0x4, 0, 0) + headers + frame(CONTINUATION, END_HEADERS, 3, b"de") + frame(PRIORITY, 0, 5, bytes(5))
            + frame(DATA, 0, 1, b"abcdef") + window_update(1, 7) + frame(DATA, END_STREAM, 1, b"xy")
            + frame(RST_STREAM, 0, 3, (8).to_bytes(4, "big")) + frame(0x6, 0, 0, bytes(8)))
    for cut in range(len(wire) + 1):
        got.clear()
        reader = FrameReader(FrameGuard(0, 1 << 20), 0, to_h2, on_data, on_window, on_headers, on_reset,
                             lambda v: got.append(("violation", v)))
        reader.feed(wire[:cut])
        reader.feed(wire[cut:])
        payload = b"".join(d[1] for k, d in got if k == "data")  # type: ignore[index]
        assert payload == b"abcdefxy", cut
        assert sum(d[2] for k, d in got if k == "data") == 8  # type: ignore[index]  # each frame's cost once
        assert [d for k, d in got if k == "window"] == [(1, 7)]
        assert [d for k, d in got if k == "headers"] == [(3, True, b"abcde")]
        assert [d for k, d in got if k == "reset"] == [(3, 8)]
        assert b"".join(d for k, d in got if k == "h2") == frame(0x4, 0, 0) + frame(0x6, 0, 0, bytes(8))  # type: ignore[misc]
        assert [d[4] for k, d in got if k == "data"][-1] is True  # type: ignore[index]
        assert [k for k, _ in got].index("headers") < [k for k, _ in got].index("data")  # in order


@pytest.mark.parametrize("wire, why", [
    (frame(HEADERS, 0, 1, b"ab") + frame(DATA, 0, 1, b"x"), "DATA frame inside the header block of stream 1"),
    (frame(HEADERS, 0, 1, b"ab") + frame(CONTINUATION, END_HEADERS, 3, b"x"), "CONTINUATION frame inside"),
    (frame(CONTINUATION, END_HEADERS, 1, b"x"), "CONTINUATION with no header block open"),
    (frame(HEADERS, END_HEADERS, 0, b"x"), "HEADERS on stream 0"),
    (frame(HEADERS, END_HEADERS | PADDED, 1, b"\x09abc"), "more padding and priority than payload"),
    (frame(RST_STREAM, 0, 1, bytes(5)), "RST_STREAM of 5 bytes"),
    (frame(RST_STREAM, 0, 0, bytes(4)), "RST_STREAM on stream 0"),
    (frame(PRIORITY, 0, 1, bytes(4)), "PRIORITY of 4 bytes"),
    (frame(0x8, 0, 1, bytes(5)), "WINDOW_UPDATE of 5 bytes"),
])
def test_the_reader_refuses_broken_stream_frames(wire: bytes, why: str) -> None:
    violations: list[Violation] = []
    reader = FrameReader(FrameGuard(0, 1 << 20), 0, lambda b: True, lambda *a: True, lambda *a: True,
                         lambda *a: True, lambda *a: True, violations.append)
    reader.feed(wire)
    assert len(violations) == 1 and why in violations[0].reason, violations


def test_a_goaway_is_the_last_frame_of_the_bytes_it_reaches_h2_with() -> None:
    """h2 refuses any frame after a GOAWAY in the same `receive_data` (its state machine is closed until
    the core reopens it for a graceful GOAWAY), so the reader hands a GOAWAY over before what follows it,
    wherever the received bytes are cut."""
    chunks: list[bytes] = []

    def to_h2(b: bytes) -> bool:
        chunks.append(bytes(b))
        return True

    goaway = frame(GOAWAY, 0, 0, (1).to_bytes(4, "big") + bytes(4))
    before, after = frame(0x4, 0x1, 0), frame(0x6, 0, 0, bytes(8)) + frame(0x4, 0, 0)
    wire = before + goaway + frame(DATA, 0, 1, b"ab") + after + frame(GOAWAY, 0, 0, bytes(8)) + frame(0x6, 0, 0, bytes(8))
    h2_bytes = before + goaway + after + frame(GOAWAY, 0, 0, bytes(8)) + frame(0x6, 0, 0, bytes(8))
    ends = {len(before + goaway), len(before + goaway + after + frame(GOAWAY, 0, 0, bytes(8)))}
    for cut in range(len(wire) + 1):
        chunks.clear()
        reader = FrameReader(FrameGuard(0, 1 << 20), 0, to_h2, lambda *a: True, lambda *a: True, lambda *a: True,
                             lambda *a: True, lambda v: None)
        reader.feed(wire[:cut])
        reader.feed(wire[cut:])
        assert b"".join(chunks) == h2_bytes, cut
        boundaries = {sum(len(c) for c in chunks[: k + 1]) for k in range(len(chunks))}
        assert ends <= boundaries, cut


def test_data_reaches_the_reader_and_padding_counts_against_the_window() -> None:
    server, _ = open_server()
    padded = bytes([3]) + b"hi" + b"\0\0\0"
    events = server.receive_data(frame(DATA, PADDED, 1, padded))
    data = of_type(events, DataReceived)
    assert [bytes(d.data) for d in data] == [b"hi"] and data[0].flow_controlled_length == len(padded)


def test_padding_longer_than_the_frame_is_a_protocol_error() -> None:
    server, _ = open_server()
    events = server.receive_data(frame(DATA, PADDED, 1, bytes([9]) + b"abc"))
    assert closed_with(events, ErrorCode.PROTOCOL_ERROR)


def test_data_on_a_stream_never_opened_is_a_protocol_error() -> None:
    server, _ = open_server()
    events = server.receive_data(frame(DATA, 0, 7, b"x"))
    assert closed_with(events, ErrorCode.PROTOCOL_ERROR)


def test_data_beyond_the_stream_window_resets_that_stream_only() -> None:
    config = HboneConfig(stream_window=65_535, connection_window=1 << 20)
    server, requests = open_server(config)
    server.receive_data(requests.connect(3))
    server.accept(3)
    events = server.receive_data(frame(DATA, 0, 1, bytes(16_384)) * 4 + frame(DATA, 0, 1, bytes(10)))
    assert any(isinstance(e, StreamReset) and e.stream_id == 1 and e.error_code == ErrorCode.FLOW_CONTROL_ERROR
               for e in events)
    assert not of_type(events, ConnectionClosed)
    assert server.stream_state(3) is not None  # the other stream goes on


def test_data_beyond_the_connection_window_closes_the_connection() -> None:
    config = HboneConfig(stream_window=1 << 20, connection_window=65_535)
    server, requests = open_server(config)
    server.receive_data(requests.connect(3))
    server.accept(3)
    events = server.receive_data(frame(DATA, 0, 1, bytes(40_000)) + frame(DATA, 0, 3, bytes(40_000)))
    assert closed_with(events, ErrorCode.FLOW_CONTROL_ERROR)


def test_window_update_of_zero_and_overflow() -> None:
    server, _ = open_server()
    events = server.receive_data(window_update(1, 0))
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCode.PROTOCOL_ERROR for e in events)
    server, _ = open_server()
    assert closed_with(server.receive_data(window_update(0, 0)), ErrorCode.PROTOCOL_ERROR)
    server, _ = open_server()
    assert closed_with(server.receive_data(window_update(0, 2**31 - 1)), ErrorCode.FLOW_CONTROL_ERROR)
    server, _ = open_server()
    bad_size = frame(0x8, 0, 0, bytes(5))
    assert closed_with(server.receive_data(bad_size), ErrorCode.FRAME_SIZE_ERROR)


def test_windows_are_given_back_as_data_is_consumed() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.244.1.5:8080")
    pair.pump()
    pair.server.accept(sid)
    pair.pump()
    sent = received = 0
    for _ in range(64):  # 16 MiB: four stream windows, one connection window
        while pair.client.can_send(sid):
            pair.client.send_data(sid, bytes(256 * 1024))
            sent += 256 * 1024
        _, server_events = pair.pump()
        for e in of_type(server_events, DataReceived):
            received += len(e.data)
            pair.server.acknowledge(sid, e.flow_controlled_length)  # consumed: the window comes back
        pair.pump()
    assert sent >= 16 * 1024 * 1024 and received >= sent - 4 * 1024 * 1024


def test_end_stream_on_a_data_frame_half_closes() -> None:
    server, _ = open_server()
    events = server.receive_data(frame(DATA, END_STREAM, 1, b"bye"))
    assert of_type(events, StreamEnded) == [StreamEnded(1)]
    server.send_data(1, b"still open this way")
    assert b"still open this way" in server.data_to_send()


# -- the HPACK encoder of the core's own header blocks -------------------------------------------------------


def test_literal_encoder_blocks_decode_to_the_same_fields_and_leave_the_table_alone() -> None:
    import hpack

    encoder, decoder = LiteralEncoder(), hpack.Decoder()
    blocks = [
        [(b":method", b"CONNECT"), (b":authority", b"10.244.1.5:8080"),
         (b"forwarded", b'for="10.244.0.7:41234";host=server.bench.svc.cluster.local'),
         (b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")],
        [(b":status", b"200")],  # a static table entry: one byte
        [(b":status", b"503"), (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"42")],
        [(b"x-long", b"v" * 300), (b"n" * 200, b"")],  # lengths past the 7-bit prefix
    ]
    for block in blocks:
        assert decoder.decode(encoder.encode(block), raw=True) == block
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    assert len(decoder.header_table.dynamic_entries) == 0  # nothing was indexed: the peer's state is untouched


def test_plain_blocks_decode_in_one_pass_as_hpack_decodes_them() -> None:
    """`decode_plain_block` reads what `LiteralEncoder` writes as hpack's decoder does, and declines (None)
    every block it must leave to the decoder: hpack's own encoding (Huffman, the dynamic table), never
    indexed fields, table size updates, an index past the static table, a cut-short block, a list over
    the size limit."""
    import random

    import hpack

    rng = random.Random(9)
    names = [b":method", b":authority", b":status", b"forwarded", b"traceparent", b"content-length",
             b"x-" + b"n" * 140, b"accept-charset", b"www-authenticate"]
    values = [b"CONNECT", b"200", b"", b"10.244.1.5:8080", b"v" * 127, b"w" * 5000, b'for="10.0.0.1:1"']
    literal = LiteralEncoder()
    for _ in range(500):
        fields = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(0, 6))]
        block = literal.encode(fields)
        assert decode_plain_block(block, 1 << 20) == fields == hpack.Decoder().decode(block, raw=True)
        size = sum(32 + len(n) + len(v) for n, v in fields)
        if fields:
            assert decode_plain_block(block, size - 1) is None  # the decoder raises OversizedHeaderListError
            assert decode_plain_block(block, size) == fields
        for cut in range(1, len(block)) if len(block) < 40 else rng.sample(range(1, len(block)), 30):
            part = decode_plain_block(block[:cut], 1 << 20)  # cut short: declined, or whole fields only
            assert part is None or part == hpack.Decoder().decode(block[:cut], raw=True)
    hpack_encoder = hpack.Encoder()  # Huffman and incremental indexing: all declined
    for fields in ([(b"x-custom", b"a value")], [(b"x-custom", b"a value")], [(b"forwarded", b"for=1")]):
        assert decode_plain_block(hpack_encoder.encode(fields), 1 << 20) is None
    never = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(b"authorization", b"secret")], huffman=False)
    assert decode_plain_block(never, 1 << 20) is None
    assert decode_plain_block(b"\x20\x88", 1 << 20) is None  # a table size update first
    assert decode_plain_block(b"\xbe", 1 << 20) is None  # index 62: the dynamic table's first entry
    assert decode_plain_block(b"\x80", 1 << 20) is None  # index 0: an error, the decoder's to say
    assert decode_plain_block(b"\x0f\x30\x01a", 1 << 20) is None  # name index 15 + 48 = 63: not static
    assert decode_plain_block(b"\x0f\x00\x01a", 1 << 20) == [(b"accept-charset", b"a")]  # 15, multi-byte
    assert decode_plain_block(b"", 1 << 20) == []


def test_a_peer_mixing_plain_and_indexed_blocks_is_read_in_order() -> None:
    """Blocks read in one pass never reach hpack's decoder, and do not need to: a peer that indexes (as
    Envoy or ztunnel may) sends CONNECTs whose later blocks refer to its earlier ones' entries, and
    they still read right with plain blocks between them."""
    import hpack

    server, _ = open_server()
    peer = hpack.Encoder()
    fields = [(b":method", b"CONNECT"), (b":authority", b"10.244.1.5:8080"), (b"x-indexed", b"kept")]
    indexed = peer.encode(fields, huffman=False)
    assert decode_plain_block(indexed, 1 << 20) is None  # (incremental indexing: hpack's decoder reads it)
    plain = LiteralEncoder().encode([(b":method", b"CONNECT"), (b":authority", b"10.244.1.6:9090")])
    assert decode_plain_block(plain, 1 << 20) is not None
    again = peer.encode(fields, huffman=False)  # the peer's table now holds the fields: a few bytes
    assert len(again) < 8
    decoded: list[bytes] = []  # the blocks hpack's decoder was given
    real_decode = server._decoder.decode

    def spied(block: bytes, raw: bool = False) -> object:
        decoded.append(block)
        return real_decode(block, raw)

    server._decoder.decode = spied  # type: ignore[method-assign]
    authorities = []
    for sid, block in ((101, indexed), (103, plain), (105, again)):
        events = server.receive_data(frame(HEADERS, END_HEADERS, sid, block))
        authorities += [str(e.request.authority) for e in of_type(events, ConnectRequested)]
    assert authorities == ["10.244.1.5:8080", "10.244.1.6:9090", "10.244.1.5:8080"]
    assert decoded == [indexed, again]


def test_literal_encoder_announces_a_changed_table_size_first() -> None:
    import hpack

    encoder, decoder = LiteralEncoder(), hpack.Decoder()
    encoder.header_table_size = 0  # the peer's SETTINGS_HEADER_TABLE_SIZE
    block = encoder.encode([(b":status", b"200")])
    assert block == b"\x20\x88"  # a size update to 0, then the field
    decoder.max_allowed_table_size = 0
    assert decoder.decode(block, raw=True) == [(b":status", b"200")]
    assert encoder.encode([(b":status", b"200")]) == b"\x88"  # announced once


def test_a_tunnel_opened_and_answered_with_the_literal_encoder_reads_back_its_headers() -> None:
    pair = Pair.make()
    sid = pair.client.open_stream("10.244.1.5:8080", [("forwarded", 'for="10.244.0.7:41234"')])
    _, server_events = pair.pump()
    request = of_type(server_events, ConnectRequested)[0].request
    assert str(request.authority) == "10.244.1.5:8080" and request.forwarded_for == "10.244.0.7:41234"
    pair.server.accept(sid)
    client_events, _ = pair.pump()
    assert of_type(client_events, StreamAccepted)[0].status == 200


def test_a_header_block_over_the_frame_size_goes_out_in_continuations_and_reads_back_whole() -> None:
    block = bytes(range(256)) * 160  # 40,960 bytes: 16 KiB frames make three
    wire = headers_frames(5, block, True, 16_384)
    assert wire[:9] == frame(HEADERS, END_STREAM, 5, block[:16_384])[:9]  # END_STREAM on the HEADERS, not END_HEADERS
    assert wire[9 + 16_384 : 18 + 16_384] == frame(CONTINUATION, 0, 5, block[16_384:32_768])[:9]
    assert wire[-(9 + 8_192) : -8_192] == frame(CONTINUATION, END_HEADERS, 5, block[32_768:])[:9]
    got: list[tuple[int, bool, bytes]] = []
    reader = FrameReader(FrameGuard(0, 1 << 20, 64 * 1024), 0, lambda b: True, lambda *a: True, lambda *a: True,
                         lambda sid, end, b: got.append((sid, end, bytes(b))) is None, lambda *a: True,
                         lambda v: got.append(v))  # type: ignore[func-returns-value]
    reader.feed(wire)
    assert got == [(5, True, block)]
    assert headers_frames(5, b"ab", False, 16_384) == frame(HEADERS, END_HEADERS, 5, b"ab")
