"""One JSON line per request, with the fields an Istio access log carries (Envoy's names in snake case)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from json.encoder import encode_basestring_ascii as _text
from math import isfinite
from typing import Any

log = logging.getLogger("waypoint.access")


@dataclass(frozen=True)
class AccessRecord:
    start_time: str
    method: str
    path: str
    protocol: str
    response_code: int
    response_flags: str
    bytes_received: int
    bytes_sent: int
    duration_ms: float
    upstream_host: str
    upstream_cluster: str
    route_name: str
    authority: str
    x_request_id: str
    traceparent: str
    downstream_peer: str
    downstream_principal: str
    request_principal: str
    user_agent: str
    authz_policy: str
    attempts: int
    details: str


# The line's keys in sorted order, and one encoder built once: this runs for every request, and
# `dataclasses.asdict` (a deep copy) or `json.dumps` with options (a new encoder per call) cost more than
# the encoding itself.  The output is that of `json.dumps(asdict(record), separators=(",", ":"),
# sort_keys=True)`, byte for byte.
_KEYS: tuple[str, ...] = tuple(sorted(f.name for f in fields(AccessRecord)))
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)  # sorting sorted keys is one pass


def format_line(record: AccessRecord) -> str:
    values = record.__dict__
    return format_values({key: values[key] for key in _KEYS})


class _NotPlain(Exception):
    """A value the written-out line does not handle (not a str, int or finite float): the encoder does."""


def _int(value: object) -> object:
    if type(value) is int:  # (not a bool or another subclass: the encoder writes those its own way)
        return value
    raise _NotPlain


def _number(value: object) -> object:
    kind = type(value)
    if kind is int:
        return value
    if kind is float and isfinite(value):  # type: ignore[arg-type]
        return repr(value)  # (what the encoder writes for a finite float)
    raise _NotPlain


def format_values(values: dict[str, Any]) -> str:
    """The line of the record whose fields are `values` (every field of `AccessRecord` by name, in any
    order; other keys are not written): `format_line(AccessRecord(**values))` without building the record
    (the proxy's hot path).

    Written out in the encoder's sorted order, each string escaped by the encoder's own C function: about
    half the encoder's time, which sorts the keys and dispatches on every value's type.  Any value the
    fields' types do not cover (None, NaN, a bool, a list, ...) goes to the encoder, so the line is
    `json.dumps(values, separators=(",", ":"), sort_keys=True)` byte for byte either way (the tests hold
    both ways to that)."""
    v = values
    try:
        return (f'{{"attempts":{_int(v["attempts"])},"authority":{_text(v["authority"])},'
                f'"authz_policy":{_text(v["authz_policy"])},"bytes_received":{_int(v["bytes_received"])},'
                f'"bytes_sent":{_int(v["bytes_sent"])},"details":{_text(v["details"])},'
                f'"downstream_peer":{_text(v["downstream_peer"])},'
                f'"downstream_principal":{_text(v["downstream_principal"])},'
                f'"duration_ms":{_number(v["duration_ms"])},"method":{_text(v["method"])},'
                f'"path":{_text(v["path"])},"protocol":{_text(v["protocol"])},'
                f'"request_principal":{_text(v["request_principal"])},"response_code":{_int(v["response_code"])},'
                f'"response_flags":{_text(v["response_flags"])},"route_name":{_text(v["route_name"])},'
                f'"start_time":{_text(v["start_time"])},"traceparent":{_text(v["traceparent"])},'
                f'"upstream_cluster":{_text(v["upstream_cluster"])},"upstream_host":{_text(v["upstream_host"])},'
                f'"user_agent":{_text(v["user_agent"])},"x_request_id":{_text(v["x_request_id"])}}}')
    except (_NotPlain, TypeError):  # (TypeError: `_text` of something not a str)
        return _ENCODER.encode({key: values[key] for key in _KEYS})  # (the fields alone, as written out above)


def logger_sink(line: str) -> None:
    log.info(line)


Sink = Callable[[str], None]
