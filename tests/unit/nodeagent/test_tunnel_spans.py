"""The node agent's tunnel spans, recorded with each connection's outcome: outbound tunnels start a trace and
hand its context to the CONNECT; inbound tunnels continue the CONNECT's context; plaintext makes none."""

from __future__ import annotations

import io
import random

from agent_resources import SLEEP, WEB, identity, pod_of, view

from mesh.hbone.headers import Authority
from mesh.tracing.propagation import parse_traceparent
from mesh.tracing.span import Span, SpanKind, StatusCode
from mesh.tracing.tracer import Tracer
from nodeagent.accesslog import AccessLog
from nodeagent.metrics import FailureReason, NodeAgentMetrics, ResponseFlag
from nodeagent.proxy import admission
from nodeagent.proxy.outcome import OutcomeRecorder
from nodeagent.proxy.routing import decide
from nodeagent.tracing import TunnelTracer

WEB2 = WEB[1]
MESH = view(SLEEP, WEB2)
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


class Sink:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def submit(self, span: Span) -> None:
        self.spans.append(span)


def recorder(pod: object, sampling: float = 100.0) -> tuple[OutcomeRecorder, Sink]:
    sink = Sink()
    tracer = TunnelTracer(Tracer(sink, sampling=sampling, rng=random.Random(5)), "node-1")
    return OutcomeRecorder(NodeAgentMetrics.create(), AccessLog(io.StringIO()), pod, tracer), sink  # type: ignore[arg-type]


def test_an_outbound_tunnel_starts_a_trace_and_hands_it_to_the_connect() -> None:
    rec, sink = recorder(pod_of(SLEEP))
    route = decide(MESH, SLEEP, "10.244.2.3", 8080)
    assert route.tunnelled
    with rec.outbound(("10.244.1.2", 40112), ("10.244.2.3", 8080), SLEEP, route) as outcome:
        ctx = parse_traceparent(outcome.traceparent)
        outcome.bytes.add_received(10)
        outcome.bytes.add_sent(20)
    (span,) = sink.spans
    assert ctx is not None and ctx.sampled and (span.trace_id, span.span_id) == (ctx.trace_id, ctx.span_id)
    assert span.parent_span_id == 0 and span.kind is SpanKind.CLIENT
    assert span.name == "outbound tunnel 10.244.2.3:8080" and span.status is StatusCode.UNSET
    attrs = dict(span.attributes)
    assert attrs["bytes_received"] == 10 and attrs["bytes_sent"] == 20 and attrs["node"] == "node-1"
    assert attrs["source.principal"] == str(identity("sleep")) and attrs["response_flags"] == "-"


def test_an_inbound_tunnel_continues_the_connects_trace() -> None:
    pod = pod_of(WEB2)
    rec, sink = recorder(pod, sampling=0.0)  # the sender's decision counts, not the agent's percentage
    conn = admission.InboundConnection("10.244.1.2", 40112, identity("sleep"), Authority(pod.ip, 8080), hbone=True,
                                       traceparent=f"00-{TRACE}-{SPAN}-01")
    verdict = admission.decide(MESH, pod, conn)
    with rec.inbound(conn, verdict, SLEEP, WEB2):
        pass
    (span,) = sink.spans
    assert f"{span.trace_id:032x}" == TRACE and f"{span.parent_span_id:016x}" == SPAN
    assert span.kind is SpanKind.SERVER and span.name == f"inbound tunnel {pod.ip}:8080"
    # Unsampled by the sender: no span; no context: the agent's own percentage (0% here).
    for traceparent in (f"00-{TRACE}-{SPAN}-00", None):
        quiet = admission.InboundConnection("10.244.1.2", 1, identity("sleep"), Authority(pod.ip, 8080),
                                            hbone=True, traceparent=traceparent)
        with rec.inbound(quiet, verdict, SLEEP, WEB2):
            pass
    assert len(sink.spans) == 1


def test_a_refused_tunnel_is_an_error_span_and_plaintext_makes_none() -> None:
    pod = pod_of(WEB2)
    rec, sink = recorder(pod)
    deny = admission.Refusal(401, ResponseFlag.DENIED, "denied by default/strict", FailureReason.DENIED)
    conn = admission.InboundConnection("10.244.1.2", 40112, identity("sleep"), Authority(pod.ip, 8080), hbone=True)
    with rec.inbound(conn, deny, SLEEP, WEB2) as outcome:
        outcome.refused(deny)
    (span,) = sink.spans
    assert span.status is StatusCode.ERROR and span.status_message == "denied by default/strict"
    assert dict(span.attributes)["response_flags"] == "RBAC"
    plain = admission.plaintext(pod, ("10.244.1.2", 33000), 8080)
    with rec.inbound(plain, admission.decide(MESH, pod, plain), SLEEP, WEB2) as outcome:
        assert outcome.traceparent is None
    assert len(sink.spans) == 1


def test_without_a_tracer_nothing_changes() -> None:
    rec = OutcomeRecorder(NodeAgentMetrics.create(), AccessLog(io.StringIO()), pod_of(SLEEP))
    with rec.outbound(("10.244.1.2", 1), ("10.244.2.3", 8080), SLEEP, decide(MESH, SLEEP, "10.244.2.3", 8080)) as o:
        assert o.traceparent is None and o.span is None
