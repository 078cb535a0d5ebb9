"""Sampling: Telemetry percentages resolved root < namespace < the waypoint's own, parent-based decisions."""

from __future__ import annotations

import random

import pytest

from mesh.tracing.context import NO_PARENT, Parent, SpanContext
from mesh.tracing.sampler import (
    DEFAULT_SAMPLING_PERCENT,
    CustomTag,
    TelemetryDoc,
    TracingPolicy,
    decide,
    resolve,
)
from mesh.tracing.span import SpanKind
from mesh.tracing.tracer import Tracer


def tel(ns: str, name: str, pct: float | None = None, **spec: object) -> TelemetryDoc:
    entry: dict[str, object] = {} if pct is None else {"randomSamplingPercentage": pct}
    entry.update(spec.pop("entry", {}))  # type: ignore[call-overload]
    return TelemetryDoc(ns, name, {"tracing": [entry], **spec})


def test_istios_default_is_one_percent() -> None:
    assert DEFAULT_SAMPLING_PERCENT == 1.0
    rng = random.Random(1)
    hits = sum(decide(NO_PARENT, TracingPolicy(), rng=rng) for _ in range(100_000))
    assert 800 < hits < 1200


@pytest.mark.parametrize("pct", [0.0, 10.0, 50.0, 100.0])
def test_the_percentage_is_honoured(pct: float) -> None:
    rng = random.Random(2)
    hits = sum(decide(NO_PARENT, TracingPolicy(percentage=pct), rng=rng) for _ in range(20_000))
    assert abs(hits / 20_000 * 100 - pct) < 1.5


def test_a_parents_decision_wins_over_the_percentage() -> None:
    ctx = SpanContext(1, 2, True)
    assert all(decide(Parent(ctx, True), TracingPolicy(percentage=0.0)) for _ in range(100))
    assert not any(decide(Parent(SpanContext(1, 2, False), False), TracingPolicy(percentage=100.0))
                   for _ in range(100))
    assert not decide(Parent(None, False), TracingPolicy(percentage=100.0))  # b3: 0 without ids
    # A context without a decision (B3 without x-b3-sampled) is sampled by the policy.
    assert decide(Parent(SpanContext(1, 2, None), None), TracingPolicy(percentage=100.0))
    assert not decide(Parent(SpanContext(1, 2, None), None), TracingPolicy(percentage=0.0))


def test_root_then_namespace_then_the_waypoints_own() -> None:
    root = tel("istio-system", "mesh-default", 5.0)
    ns = tel("bookinfo", "ns", 50.0)
    own = tel("bookinfo", "wp", 100.0, targetRefs=[{"kind": "Gateway", "name": "waypoint"}])
    assert resolve([], namespace="bookinfo", gateway="waypoint") == TracingPolicy()
    assert resolve([root], namespace="bookinfo").percentage == 5.0
    assert resolve([root, ns], namespace="bookinfo").percentage == 50.0
    assert resolve([root, ns, own], namespace="bookinfo", gateway="waypoint").percentage == 100.0
    assert resolve([root, ns, own], namespace="bookinfo", gateway="other").percentage == 50.0
    # Another namespace's Telemetry is not this proxy's.
    assert resolve([root, ns], namespace="legacy").percentage == 5.0
    assert resolve([root, ns, own], namespace="legacy", gateway="waypoint").percentage == 5.0


def test_fields_merge_most_specific_first() -> None:
    root = tel("istio-system", "mesh-default", 5.0, entry={"disableSpanReporting": True})
    ns = tel("bookinfo", "ns", entry={"customTags": {"team": {"literal": {"value": "books"}}}})
    policy = resolve([root, ns], namespace="bookinfo")
    assert policy.percentage == 5.0 and policy.reporting is False
    assert policy.custom_tags == (CustomTag("team", "literal", "books"),)
    assert policy.sources == ("istio-system/mesh-default", "bookinfo/ns")
    on_again = tel("bookinfo", "ns", entry={"disableSpanReporting": False})
    assert resolve([root, on_again], namespace="bookinfo").reporting is True


def test_what_does_not_apply_to_a_waypoint() -> None:
    selected = tel("bookinfo", "for-sidecars", 100.0, selector={"matchLabels": {"app": "reviews"}})
    assert resolve([selected], namespace="bookinfo").percentage is None
    # targetRefs from another namespace reach only from the root namespace.
    foreign = tel("legacy", "x", 100.0, targetRefs=[{"kind": "Gateway", "name": "waypoint", "namespace": "bookinfo"}])
    assert resolve([foreign], namespace="bookinfo", gateway="waypoint").percentage is None
    from_root = tel("istio-system", "x", 30.0,
                    targetRefs=[{"kind": "Gateway", "name": "waypoint", "namespace": "bookinfo"}])
    assert resolve([from_root], namespace="bookinfo", gateway="waypoint").percentage == 30.0
    # Of two at one level, the first by name.
    assert resolve([tel("bookinfo", "b", 20.0), tel("bookinfo", "a", 10.0)], namespace="bookinfo").percentage == 10.0


def test_the_tracer_continues_the_parent_and_records_only_what_is_sampled() -> None:
    recorded: list = []

    class Sink:
        def submit(self, span: object) -> None:
            recorded.append(span)

    tracer = Tracer(Sink(), sampling=0.0, rng=random.Random(3))
    parent = Parent(SpanContext(0xABC, 0xDEF, True, "k=v"), True)
    started = tracer.start(parent)
    assert started.context.trace_id == 0xABC and started.context.span_id != 0xDEF
    assert started.parent_span_id == 0xDEF and started.context.trace_state == "k=v" and started.recording
    unsampled = tracer.start(NO_PARENT)  # 0% by default here
    assert not unsampled.recording and unsampled.parent_span_id == 0 and unsampled.context.sampled is False
    quiet = tracer.start(parent, TracingPolicy(reporting=False))  # disableSpanReporting: ids, no span
    assert quiet.context.sampled and not quiet.recording
    for s in (started, unsampled, quiet):
        tracer.finish(s, "op", SpanKind.SERVER)
    assert [(r.trace_id, r.parent_span_id) for r in recorded] == [(0xABC, 0xDEF)]
    assert not Tracer(None).start(parent).recording  # no exporter: nothing to record, ids still made
