"""Trace and span identifiers, and the context a span hands to its children.

A `SpanContext` is what crosses process boundaries: the 128-bit trace id, the 64-bit id of the span
that is the parent of whatever the receiver does, whether the trace is sampled, and W3C `tracestate`.
A `Parent` is what a proxy found on an incoming request: a context when one was there and well formed,
and the caller's sampling decision when it gave one (B3 lets a caller decide without ids: `b3: 0`).
Ids are drawn from a per-process PRNG seeded from the OS: they need to be unique, not secret.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

TRACE_ID_BITS = 128
SPAN_ID_BITS = 64

_rng = random.Random(int.from_bytes(os.urandom(16), "big"))


def new_trace_id(rng: random.Random | None = None) -> int:
    """A random, non-zero 128-bit trace id."""
    r = rng or _rng
    while True:
        value = r.getrandbits(TRACE_ID_BITS)
        if value:
            return value


def new_span_id(rng: random.Random | None = None) -> int:
    """A random, non-zero 64-bit span id."""
    r = rng or _rng
    while True:
        value = r.getrandbits(SPAN_ID_BITS)
        if value:
            return value


def trace_hex(trace_id: int) -> str:
    return f"{trace_id:032x}"


def span_hex(span_id: int) -> str:
    return f"{span_id:016x}"


@dataclass(frozen=True)
class SpanContext:
    """One span as its children see it.  `sampled` None: the decision was left to the receiver."""

    trace_id: int
    span_id: int
    sampled: bool | None = None
    trace_state: str = ""  # W3C tracestate, passed on unchanged

    @property
    def trace_hex(self) -> str:
        return trace_hex(self.trace_id)

    @property
    def span_hex(self) -> str:
        return span_hex(self.span_id)


@dataclass(frozen=True)
class Parent:
    """What an incoming request said about its trace.

    `context`: the caller's span, None when no well-formed context came; `sampled`: the caller's
    decision, None when it gave none; `b3_single`: the context came as one `b3` header, so it is answered
    in kind (besides `traceparent` and the multi-header B3 set, which are always written)."""

    context: SpanContext | None = None
    sampled: bool | None = None
    b3_single: bool = False


NO_PARENT = Parent()
