"""Trace context in HTTP headers: W3C Trace Context and Zipkin's B3, read and written (pure).

Read (`extract`), in this order of preference:

    traceparent: 00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>   (W3C; tracestate with it)
    b3: <trace id>-<span id>[-<sampled: 0|1|d>[-<parent span id>]]  or just  b3: <0|1|d>
    x-b3-traceid (16 or 32 hex), x-b3-spanid (16 hex), x-b3-parentspanid, x-b3-sampled (0|1), x-b3-flags (1)

A header that is malformed (wrong length, not hex, all zeros, a W3C version `ff`, upper case in W3C) is
ignored as if it were absent, never an error: the request goes on with a new trace, and the bad header
is overwritten on the way out.  A 64-bit B3 trace id is widened to 128 bits with leading zeros.

Written (`headers`): the span the proxy made for the request becomes the parent of what the application
does next: `traceparent` (and the incoming `tracestate`), the multi-header B3 set (`x-b3-parentspanid`
the proxy's own parent), and the single `b3` header when the request came with one.  Every other
propagation header is removed (`PROPAGATION_HEADERS`), so what leaves is always consistent.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mesh.tracing.context import NO_PARENT, Parent, SpanContext, span_hex, trace_hex

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
B3 = "b3"
B3_TRACE_ID = "x-b3-traceid"
B3_SPAN_ID = "x-b3-spanid"
B3_PARENT_SPAN_ID = "x-b3-parentspanid"
B3_SAMPLED = "x-b3-sampled"
B3_FLAGS = "x-b3-flags"
PROPAGATION_HEADERS = (TRACEPARENT, TRACESTATE, B3, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED,
                       B3_FLAGS)

MAX_TRACESTATE = 512  # W3C: a vendor may drop a longer tracestate; this one does, rather than cut entries

_W3C = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_TRACE_ID = re.compile(r"^(?:[0-9a-f]{16}|[0-9a-f]{32})$")

Getter = Callable[[str], "str | None"]


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The context in a `traceparent` value, or None if it is absent or malformed."""
    if not value:
        return None
    value = value.strip()
    m = _W3C.match(value)
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None  # ff is forbidden; version 00 has exactly four fields
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, sampled=bool(int(flags, 16) & 1))


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_hex}-{ctx.span_hex}-{'01' if ctx.sampled else '00'}"


def _b3_ids(trace: str, span: str) -> tuple[int, int] | None:
    trace, span = trace.lower(), span.lower()
    if not _TRACE_ID.match(trace) or not _HEX16.match(span):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id


def _b3_sampled(value: str | None) -> bool | None:
    """`0`/`false` no, `1`/`true`/`d` (debug) yes, anything else: no decision."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "true", "d"):
        return True
    if v in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str | None) -> Parent | None:
    """The `b3` header: ids with an optional decision and parent, or a decision alone; None if malformed."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) == 1:
        decision = _b3_sampled(parts[0]) if parts[0] in ("0", "1", "d") else None
        return None if decision is None else Parent(None, decision, b3_single=True)
    if len(parts) > 4:
        return None
    ids = _b3_ids(parts[0], parts[1])
    if ids is None:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        if parts[2] not in ("0", "1", "d"):
            return None
        sampled = _b3_sampled(parts[2])
    if len(parts) == 4 and not _HEX16.match(parts[3].lower()):
        return None
    return Parent(SpanContext(ids[0], ids[1], sampled), sampled, b3_single=True)


def parse_b3_multi(get: Getter) -> Parent | None:
    """The `x-b3-*` headers; None if they carry neither well-formed ids nor a decision."""
    sampled = True if (get(B3_FLAGS) or "").strip() == "1" else _b3_sampled(get(B3_SAMPLED))
    trace, span = get(B3_TRACE_ID), get(B3_SPAN_ID)
    ids = _b3_ids(trace.strip(), span.strip()) if trace and span else None
    if ids is not None:
        return Parent(SpanContext(ids[0], ids[1], sampled), sampled)
    return Parent(None, sampled) if sampled is not None else None


def extract(get: Getter) -> Parent:
    """What the request's headers say about its trace (`get(name)`: the first value of a lower-case
    header name, or None); `NO_PARENT` when nothing well formed is there."""
    ctx = parse_traceparent(get(TRACEPARENT))
    if ctx is not None:
        state = (get(TRACESTATE) or "").strip()
        if state and len(state) <= MAX_TRACESTATE and "\n" not in state:
            ctx = SpanContext(ctx.trace_id, ctx.span_id, ctx.sampled, state)
        return Parent(ctx, ctx.sampled, b3_single=get(B3) is not None)
    for parsed in (parse_b3_single(get(B3)), parse_b3_multi(get)):
        if parsed is not None:
            return parsed
    return NO_PARENT


def headers(ctx: SpanContext, parent_span_id: int = 0, *, b3_single: bool = False) -> list[tuple[str, str]]:
    """The propagation headers of a request sent on behalf of span `ctx` (whose own parent is
    `parent_span_id`, 0 for a root span).  Remove every `PROPAGATION_HEADERS` name first, then add these."""
    sampled = "1" if ctx.sampled else "0"
    out = [(TRACEPARENT, format_traceparent(ctx))]
    if ctx.trace_state:
        out.append((TRACESTATE, ctx.trace_state))
    out += [(B3_TRACE_ID, trace_hex(ctx.trace_id)), (B3_SPAN_ID, span_hex(ctx.span_id))]
    if parent_span_id:
        out.append((B3_PARENT_SPAN_ID, span_hex(parent_span_id)))
    out.append((B3_SAMPLED, sampled))
    if b3_single:
        single = f"{ctx.trace_hex}-{ctx.span_hex}-{sampled}"
        out.append((B3, single + (f"-{span_hex(parent_span_id)}" if parent_span_id else "")))
    return out
