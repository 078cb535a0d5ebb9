"""One JSON line per request, with the fields an Istio access log carries (Envoy's names in snake case)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
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
    return _ENCODER.encode({key: values[key] for key in _KEYS})


def format_values(values: dict[str, Any]) -> str:
    """The line of the record whose fields are `values` (every field of `AccessRecord` by name, in any
    order): `format_line(AccessRecord(**values))` without building the record (the proxy's hot path)."""
    return _ENCODER.encode(values)


def logger_sink(line: str) -> None:
    log.info(line)


Sink = Callable[[str], None]
