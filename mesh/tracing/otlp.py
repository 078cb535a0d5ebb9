"""OTLP encoding: spans to an `ExportTraceServiceRequest` (protobuf, `mesh/proto/otlp.proto`) and back.

`encode(resource, spans)` is what the exporter POSTs to `/v1/traces` (`Content-Type:
application/x-protobuf`); `decode(body)` and `received(request)` are what a receiver does with it, to
plain `ReceivedSpan` values (the receiver in `mesh.tracing.receiver`, tests, a dashboard).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh.proto import otlp_pb2 as otlp
from mesh.tracing.errors import OtlpError
from mesh.tracing.span import Attributes, AttributeValue, Resource, Span

CONTENT_TYPE = "application/x-protobuf"
TRACES_PATH = "/v1/traces"
SCOPE_NAME = "ambient-mesh"
SCOPE_VERSION = "0.1.0"
FLAG_SAMPLED = 0x01  # W3C trace flags, in the span's `flags` (bits 0-7)


def _value(v: AttributeValue) -> otlp.AnyValue:
    if isinstance(v, bool):
        return otlp.AnyValue(bool_value=v)
    if isinstance(v, int):
        return otlp.AnyValue(int_value=v)
    if isinstance(v, float):
        return otlp.AnyValue(double_value=v)
    return otlp.AnyValue(string_value=str(v))


def _attributes(attrs: Attributes) -> list[otlp.KeyValue]:
    return [otlp.KeyValue(key=k, value=_value(v)) for k, v in attrs]


def _span(s: Span) -> otlp.Span:
    return otlp.Span(
        trace_id=s.trace_id.to_bytes(16, "big"), span_id=s.span_id.to_bytes(8, "big"),
        parent_span_id=s.parent_span_id.to_bytes(8, "big") if s.parent_span_id else b"",
        trace_state=s.trace_state, name=s.name, kind=otlp.Span.SpanKind.ValueType(s.kind),
        start_time_unix_nano=s.start_ns, end_time_unix_nano=s.end_ns, attributes=_attributes(s.attributes),
        status=otlp.Status(code=otlp.Status.StatusCode.ValueType(s.status), message=s.status_message),
        flags=FLAG_SAMPLED if s.sampled else 0)


def encode(resource: Resource, spans: Sequence[Span]) -> bytes:
    """One ExportTraceServiceRequest with every span under one resource and one scope."""
    request = otlp.ExportTraceServiceRequest(resource_spans=[otlp.ResourceSpans(
        resource=_resource_pb(resource),
        scope_spans=[otlp.ScopeSpans(scope=otlp.InstrumentationScope(name=SCOPE_NAME, version=SCOPE_VERSION),
                                      spans=[_span(s) for s in spans])])])
    return request.SerializeToString()


def _resource_pb(resource: Resource) -> otlp.Resource:
    return otlp.Resource(attributes=_attributes(resource.attributes))


# ---- receiving ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as a receiver sees it, with its reporter's resource attributes."""

    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str  # 16 hex, "" for a root span
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue]
    resource: dict[str, AttributeValue]
    status_code: int = 0
    status_message: str = ""

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


def decode(body: bytes) -> otlp.ExportTraceServiceRequest:
    """The request in an OTLP/HTTP protobuf body; `OtlpError` if it is not one."""
    request = otlp.ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise OtlpError(f"not an OTLP ExportTraceServiceRequest (protobuf): {exc}") from None
    return request


def _plain(v: otlp.AnyValue) -> AttributeValue:
    which = v.WhichOneof("value")
    if which in ("string_value", "bool_value", "int_value", "double_value"):
        out: AttributeValue = getattr(v, which)
        return out
    return str(v).strip()


def _plain_attributes(kvs: Iterable[otlp.KeyValue]) -> dict[str, AttributeValue]:
    return {kv.key: _plain(kv.value) for kv in kvs}


def received(request: otlp.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of an export, flattened, each with its resource's attributes."""
    out = []
    for rs in request.resource_spans:
        resource = _plain_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                    name=s.name, kind=otlp.Span.SpanKind.ValueType(s.kind), start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes=_plain_attributes(s.attributes), resource=resource,
                    status_code=int(s.status.code), status_message=s.status.message))
    return out
