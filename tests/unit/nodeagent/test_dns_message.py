"""DNS messages, sans-IO: queries read, answers written, and bytes that are not a query refused with a
reason (never an exception of another kind)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.dns.message import (
    FLAG_QR,
    FLAG_RD,
    HEADER,
    DnsFormatError,
    QType,
    Rcode,
    answer,
    build_query,
    encode_name,
    format_error,
    parse_query,
    parse_response,
    read_name,
    refusal,
    type_name,
)


def test_a_query_reads_back_and_its_answer_carries_the_addresses() -> None:
    query = parse_query(build_query(0x1234, "Hello.Apps.svc.cluster.local.", QType.A))
    assert (query.id, query.name, query.qtype, query.recursion_desired) == (
        0x1234, "hello.apps.svc.cluster.local", QType.A, True)
    reply = answer(query, ["10.96.0.10", "fd00::1", "10.96.0.11"], ttl=7)
    parsed = parse_response(reply)
    assert (parsed.id, parsed.rcode, parsed.addresses, parsed.ttl) == (0x1234, 0, ("10.96.0.10", "10.96.0.11"), 7)
    flags = HEADER.unpack_from(reply)[1]
    assert flags & FLAG_QR and flags & FLAG_RD and flags & 0x0400  # a response, RD echoed, authoritative


def test_aaaa_of_a_known_name_is_an_empty_noerror() -> None:
    query = parse_query(build_query(9, "hello", QType.AAAA))
    parsed = parse_response(answer(query, ["10.96.0.10"]))
    assert (parsed.rcode, parsed.addresses) == (Rcode.NOERROR, ())


def test_refusals_keep_the_question() -> None:
    query = parse_query(build_query(77, "nowhere.test"))
    reply = refusal(query, Rcode.SERVFAIL)
    assert parse_response(reply).rcode == Rcode.SERVFAIL
    assert reply[12:] == query.question


def test_compressed_names_are_followed() -> None:
    message = b"\x00" * 12 + encode_name("example.com") + b"\x03www\xc0\x0c"
    assert read_name(message, 12 + len(encode_name("example.com"))) == ("www.example.com", len(message))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "shorter than a DNS header"),
    (b"\x00\x01\x00", "shorter than a DNS header"),
    (HEADER.pack(1, FLAG_QR, 1, 0, 0, 0) + encode_name("a") + b"\0\1\0\1", "is a response"),
    (HEADER.pack(1, 0, 2, 0, 0, 0) + encode_name("a") + b"\0\1\0\1", "exactly one question"),
    (HEADER.pack(1, 0, 0, 0, 0, 0), "exactly one question"),
    (HEADER.pack(1, 0, 1, 1, 0, 0) + encode_name("a") + b"\0\1\0\1", "must not carry answer"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x05ab", "runs past the end"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + encode_name("a"), "cut short before its type"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1", "points forward"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x80abc\0\0\1\0\1", "reserved length bits"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + b"\x03\xff\xfe\xfd\0\0\1\0\1", "not ASCII"),
    (HEADER.pack(1, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\0\0\1\0\1", "longer than 255"),
])
def test_bad_queries_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(DnsFormatError, match=reason):
        parse_query(data)


def test_format_error_answers_what_has_an_id_and_never_a_response() -> None:
    reply = format_error(b"\xab\xcd\x01\x00garbage")
    assert reply is not None
    qid, flags = struct.unpack_from("!HH", reply)
    assert (qid, flags & FLAG_QR, flags & 0xF) == (0xABCD, FLAG_QR, Rcode.FORMERR)
    assert format_error(b"\x01") is None
    assert format_error(b"\xab\xcd\x81\x80") is None  # a response: answering it could loop


def test_type_names_are_ztunnels_labels() -> None:
    assert (type_name(1), type_name(28), type_name(33), type_name(4242)) == ("a", "aaaa", "srv", "type4242")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_query_or_a_format_error(data: bytes) -> None:
    try:
        query = parse_query(data)
    except DnsFormatError:
        reply = format_error(data)
        assert reply is None or len(reply) == HEADER.size
        return
    assert parse_response(answer(query, ["10.0.0.1"])).id == query.id


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True), min_size=1, max_size=6),
       st.sampled_from([QType.A, QType.AAAA, QType.SRV]))
def test_names_round_trip(labels: list[str], qtype: int) -> None:
    name = ".".join(labels)
    query = parse_query(build_query(5, name, qtype))
    assert (query.name, query.qtype) == (name, qtype)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_upstream_bytes_are_an_answer_or_a_format_error(data: bytes) -> None:
    try:
        response = parse_response(data)
    except DnsFormatError:
        return
    assert response.id == int.from_bytes(data[:2], "big")
