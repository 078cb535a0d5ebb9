"""The access log line is built without `dataclasses.asdict`; it must stay byte for byte what it was."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.accesslog import AccessRecord, format_line


def reference_line(record: AccessRecord) -> str:
    """The line as the waypoint wrote it before (a deep copy, then `json.dumps` with sorted keys)."""
    return json.dumps(asdict(record), separators=(",", ":"), sort_keys=True)


def _field_strategy(kind: object) -> st.SearchStrategy[object]:
    if kind == "int":
        return st.integers(min_value=-(2**70), max_value=2**70)
    if kind == "float":
        return st.floats(allow_nan=True, allow_infinity=True)
    return st.text()  # any code point: quotes, backslashes, control characters, surrogates, non-ASCII


RECORDS = st.fixed_dictionaries({f.name: _field_strategy(f.type) for f in fields(AccessRecord)}).map(
    lambda kw: AccessRecord(**kw))


@settings(max_examples=1000, deadline=None)
@given(RECORDS)
def test_line_is_byte_identical_to_the_asdict_line(record: AccessRecord) -> None:
    assert format_line(record) == reference_line(record)


def test_a_typical_line() -> None:
    record = AccessRecord(
        start_time="2026-01-02T03:04:05.678+00:00", method="GET", path="/a?b=\"c\"", protocol="HTTP/1.1",
        response_code=200, response_flags="-", bytes_received=12, bytes_sent=1024, duration_ms=1.25,
        upstream_host="10.0.0.1:8080", upstream_cluster="outbound|80||web.prod.svc.cluster.local",
        route_name="default", authority="web.prod", x_request_id="id-1", traceparent="", downstream_peer="10.0.0.2:5",
        downstream_principal="spiffe://cluster.local/ns/default/sa/sleep", request_principal="", user_agent="ü\n",
        authz_policy="", attempts=1, details="via_upstream")
    line = format_line(record)
    assert line == reference_line(record)
    parsed = json.loads(line)
    assert list(parsed) == sorted(parsed)
    assert parsed["user_agent"] == "ü\n" and "\\u00fc\\n" in line  # ASCII only, as json.dumps writes it


def test_values_that_are_not_scalars_are_written_as_before() -> None:
    # the fields are typed as scalars, but a caller handing a list or a dict must get the same line
    record = AccessRecord(**{f.name: "" for f in fields(AccessRecord)} | {"details": {"b": [1, {"z": 1, "a": 2}],
                                                                                    "a": (1, 2)}})
    assert format_line(record) == reference_line(record)
