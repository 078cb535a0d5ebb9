"""Trace context in headers: W3C and B3 read and written, round trips, and bad headers ignored safely."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.tracing import propagation
from mesh.tracing.context import NO_PARENT, Parent, SpanContext, new_span_id, new_trace_id
from mesh.tracing.propagation import (
    PROPAGATION_HEADERS,
    extract,
    format_traceparent,
    headers,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def getter(**values: str):  # type: ignore[no-untyped-def]
    table = {k.replace("_", "-"): v for k, v in values.items()}
    return lambda name: table.get(name)


# ---- W3C --------------------------------------------------------------------------------------------------


def test_traceparent_is_read() -> None:
    ctx = parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert ctx == SpanContext(int(TRACE, 16), int(SPAN, 16), sampled=True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == SpanContext(int(TRACE, 16), int(SPAN, 16), sampled=False)
    # Only bit 0 of the flags is the sampled flag; the others are kept out of the decision.
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03").sampled is True  # type: ignore[union-attr]
    # A later version may add fields after the four it shares with 00.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-more") is not None


@pytest.mark.parametrize("value", [
    "", "garbage", f"00-{TRACE}-{SPAN}",  # too few fields
    f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four
    f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
    f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",  # all-zero ids are invalid
    f"00-{TRACE.upper()}-{SPAN}-01",  # W3C ids are lower-case hex
    f"00-{TRACE[:-1]}-{SPAN}-01", f"00-{TRACE}-{SPAN}z-01", f"00-{TRACE}-{SPAN}-1", f"0-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-0g",
])
def test_malformed_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) is None
    parent = extract(getter(traceparent=value, tracestate="k=v"))
    assert parent == NO_PARENT  # no context, no decision: a new trace, sampled by the policy


def test_tracestate_rides_with_a_valid_traceparent_only() -> None:
    parent = extract(getter(traceparent=f"00-{TRACE}-{SPAN}-01", tracestate="congo=t61rcWkgMzE,rojo=00f067aa"))
    assert parent.context is not None and parent.context.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa"
    long_state = extract(getter(traceparent=f"00-{TRACE}-{SPAN}-01", tracestate="k=" + "v" * 600))
    assert long_state.context is not None and long_state.context.trace_state == ""


# ---- B3 ---------------------------------------------------------------------------------------------------


def test_b3_multi_headers() -> None:
    parent = parse_b3_multi(getter(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="1"))
    assert parent == Parent(SpanContext(int(TRACE, 16), int(SPAN, 16), True), True)
    # 64-bit trace ids are widened; no sampling header leaves the decision to the receiver.
    short = parse_b3_multi(getter(x_b3_traceid=TRACE[16:], x_b3_spanid=SPAN))
    assert short is not None and short.context is not None
    assert short.context.trace_hex == "0" * 16 + TRACE[16:] and short.sampled is None
    # Debug (x-b3-flags: 1) means sampled; a decision alone (no ids) is still a decision.
    assert parse_b3_multi(getter(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_flags="1", x_b3_sampled="0")).sampled is True  # type: ignore[union-attr]
    assert parse_b3_multi(getter(x_b3_sampled="0")) == Parent(None, False)
    assert parse_b3_multi(getter(x_b3_traceid="xyz", x_b3_spanid=SPAN)) is None
    assert parse_b3_multi(getter(x_b3_traceid=TRACE, x_b3_spanid="0" * 16)) is None


@pytest.mark.parametrize(("value", "expected"), [
    (f"{TRACE}-{SPAN}-1", Parent(SpanContext(int(TRACE, 16), int(SPAN, 16), True), True, b3_single=True)),
    (f"{TRACE}-{SPAN}-0-{'1' * 16}", Parent(SpanContext(int(TRACE, 16), int(SPAN, 16), False), False, b3_single=True)),
    (f"{TRACE}-{SPAN}-d", Parent(SpanContext(int(TRACE, 16), int(SPAN, 16), True), True, b3_single=True)),
    (f"{TRACE}-{SPAN}", Parent(SpanContext(int(TRACE, 16), int(SPAN, 16), None), None, b3_single=True)),
    ("0", Parent(None, False, b3_single=True)),
    ("1", Parent(None, True, b3_single=True)),
])
def test_b3_single_header(value: str, expected: Parent) -> None:
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize("value", ["", "x", "2", f"{TRACE}", f"{TRACE}-{SPAN}-2", f"{TRACE}-{SPAN}-1-zz",
                                   f"{TRACE}-{SPAN}-1-{SPAN}-extra", f"{TRACE}x-{SPAN}-1", f"{TRACE}-{SPAN[:-2]}-1"])
def test_malformed_b3_single_is_ignored(value: str) -> None:
    assert parse_b3_single(value) is None


def test_preference_is_w3c_then_single_b3_then_multi_b3() -> None:
    other = "1" * 32
    both = extract(getter(traceparent=f"00-{TRACE}-{SPAN}-00", b3=f"{other}-{SPAN}-1", x_b3_traceid=other,
                          x_b3_spanid=SPAN, x_b3_sampled="1"))
    assert both.context is not None and both.context.trace_hex == TRACE and both.sampled is False
    assert both.b3_single  # the request had a single b3 header: it is answered in kind
    single = extract(getter(b3=f"{other}-{SPAN}-1", x_b3_traceid=TRACE, x_b3_spanid=SPAN))
    assert single.context is not None and single.context.trace_hex == other
    # A bad traceparent falls through to B3.
    fallback = extract(getter(traceparent="bogus", x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="1"))
    assert fallback.context is not None and fallback.context.trace_hex == TRACE and fallback.sampled


# ---- writing, and round trips ------------------------------------------------------------------------------


def test_headers_of_a_child_span() -> None:
    ctx = SpanContext(int(TRACE, 16), 0x1111111111111111, True, "rojo=1")
    out = dict(headers(ctx, int(SPAN, 16)))
    assert out == {
        "traceparent": f"00-{TRACE}-1111111111111111-01", "tracestate": "rojo=1", "x-b3-traceid": TRACE,
        "x-b3-spanid": "1111111111111111", "x-b3-parentspanid": SPAN, "x-b3-sampled": "1",
    }
    single = dict(headers(SpanContext(int(TRACE, 16), 0x22, False), 0, b3_single=True))
    assert single["b3"] == f"{TRACE}-0000000000000022-0" and "x-b3-parentspanid" not in single
    assert set(out) | set(single) <= set(PROPAGATION_HEADERS)


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.booleans(), st.integers(0, 2**64 - 1))
def test_round_trips(trace_id: int, span_id: int, sampled: bool, parent: int) -> None:
    ctx = SpanContext(trace_id, span_id, sampled)
    assert parse_traceparent(format_traceparent(ctx)) == ctx
    written = dict(headers(ctx, parent, b3_single=True))
    assert parse_b3_single(written["b3"]) == Parent(ctx, sampled, b3_single=True)
    multi = parse_b3_multi(written.get)
    assert multi == Parent(ctx, sampled)
    # Read back whole: the same context, whichever header a receiver prefers.
    again = extract(written.get)
    assert again.context == ctx and again.sampled == sampled


@given(st.dictionaries(st.sampled_from(PROPAGATION_HEADERS), st.text(max_size=80)))
def test_any_header_values_never_raise(values: dict[str, str]) -> None:
    parent = extract(values.get)
    if parent.context is not None:
        assert parent.context.trace_id and parent.context.span_id


def test_ids_are_random_and_never_zero() -> None:
    rng = random.Random(7)
    traces = {new_trace_id(rng) for _ in range(1000)}
    spans = {new_span_id(rng) for _ in range(1000)}
    assert len(traces) == 1000 and len(spans) == 1000 and 0 not in traces | spans
    assert all(t < 2**128 for t in traces) and all(s < 2**64 for s in spans)
    assert propagation.parse_traceparent(format_traceparent(SpanContext(new_trace_id(), new_span_id(), True)))
