"""Span records: what a proxy reports about one piece of work, as plain frozen values.

A finished `Span` is handed to the exporter and never changes again, so encoding may happen in another
thread.  `Resource` is who reported it (OpenTelemetry resource attributes: `service.name`, ...), the same
for every span of a process.  Kinds and status codes have OTLP's numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

AttributeValue = str | bool | int | float
Attributes = tuple[tuple[str, AttributeValue], ...]


class SpanKind(enum.IntEnum):
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3


class StatusCode(enum.IntEnum):
    UNSET = 0
    OK = 1
    ERROR = 2


@dataclass(frozen=True)
class Span:
    trace_id: int
    span_id: int
    parent_span_id: int  # 0 for a root span
    name: str
    kind: SpanKind
    start_ns: int  # Unix time, nanoseconds
    end_ns: int
    attributes: Attributes = ()
    status: StatusCode = StatusCode.UNSET
    status_message: str = ""
    trace_state: str = ""
    sampled: bool = True

    def attribute(self, key: str) -> AttributeValue | None:
        return next((v for k, v in self.attributes if k == key), None)


@dataclass(frozen=True)
class Resource:
    """The reporting process (OpenTelemetry resource attributes)."""

    attributes: Attributes = ()

    @classmethod
    def of(cls, attributes: Mapping[str, AttributeValue]) -> Resource:
        return cls(tuple((k, v) for k, v in attributes.items() if v != ""))

    @property
    def service_name(self) -> str:
        return str(next((v for k, v in self.attributes if k == "service.name"), ""))
