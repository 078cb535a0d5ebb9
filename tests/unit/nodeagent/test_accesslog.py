"""Access log: one JSON line per connection, stable keys, writes that never raise."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import random

import pytest

from mesh import logs
from mesh.policy.evaluator import Decision, PolicyMatch
from nodeagent.accesslog import (
    INBOUND,
    OUTBOUND,
    RESULT_OK,
    AccessLog,
    AccessLogEntry,
    Peer,
    _Clock,
    _iso,
    as_record,
    decision_fields,
    format_entry,
    result_bad_request,
    result_denied,
    result_upstream_failed,
)

SRC = Peer("10.244.1.3", 40112, "sleep-1", "default", "spiffe://cluster.local/ns/default/sa/sleep")
DST = Peer("10.244.2.5", 8080, "web-1", "prod", "spiffe://cluster.local/ns/prod/sa/web")
ENTRY = AccessLogEntry(
    direction=INBOUND, start=1714564800.1234, duration=0.0125, source=SRC, destination=DST, result=RESULT_OK,
    destination_service="web.prod.svc.cluster.local", bytes_sent=512, bytes_received=78,
    connection_security_policy="mutual_tls",
)


def test_format_is_one_json_line_with_all_fields() -> None:
    line = format_entry(ENTRY)
    assert "\n" not in line
    rec = json.loads(line)
    assert rec == {
        "time": "2024-05-01T12:00:00.123Z",
        "direction": "inbound",
        "result": "200",
        "duration_ms": 12.5,
        "source_address": "10.244.1.3:40112",
        "source_workload": "sleep-1",
        "source_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/sleep",
        "destination_address": "10.244.2.5:8080",
        "destination_workload": "web-1",
        "destination_namespace": "prod",
        "destination_principal": "spiffe://cluster.local/ns/prod/sa/web",
        "destination_service": "web.prod.svc.cluster.local",
        "bytes_sent": 512,
        "bytes_received": 78,
        "connection_security_policy": "mutual_tls",
    }
    assert list(rec)[:3] == ["time", "direction", "result"]


def test_unknowns_and_optional_fields() -> None:
    e = AccessLogEntry(direction=OUTBOUND, start=0, duration=-1, source=Peer("fd00::1", 5), destination=Peer(),
                       result=result_denied("denied by prod/deny-all"), policy="prod/deny-all",
                       audited=("prod/audit",), dry_run=("prod/would-deny (DENY)",), error="peer reset\n\"x\"")
    rec = json.loads(format_entry(e))
    assert rec["source_address"] == "[fd00::1]:5"
    assert rec["destination_address"] == "unknown"
    assert rec["source_workload"] == rec["destination_principal"] == rec["destination_service"] == "unknown"
    assert rec["duration_ms"] == 0
    assert rec["result"] == "401 denied by prod/deny-all"
    assert rec["policy"] == "prod/deny-all"
    assert rec["audited"] == ["prod/audit"]
    assert rec["dry_run"] == ["prod/would-deny (DENY)"]
    assert rec["error"] == "peer reset\n\"x\""
    assert "policy" not in json.loads(format_entry(ENTRY))


@pytest.mark.parametrize("entry", [
    ENTRY,
    AccessLogEntry(direction=OUTBOUND, start=0, duration=-1, source=Peer("fd00::1", 5), destination=Peer(),
                   result=result_denied("denied by prod/deny-all"), policy="prod/deny-all",
                   audited=("prod/audit", "a/b"), dry_run=("prod/would-deny (DENY)",), error="reset\n\"x\"\t\\"),
    dataclasses.replace(ENTRY, duration=0, error="caf\u00e9 \U0001f600 \x00", destination_service=""),
    dataclasses.replace(ENTRY, start=1714564800.9999996, duration=1e-7, bytes_sent=2**70),
    dataclasses.replace(ENTRY, bytes_sent=True),  # not the declared types: the encoder writes them
    dataclasses.replace(ENTRY, duration=float("nan")),
    dataclasses.replace(ENTRY, duration=float("inf"), result=None),  # type: ignore[arg-type]
])
def test_the_written_out_line_is_the_encoders_byte_for_byte(entry: AccessLogEntry) -> None:
    assert format_entry(entry) == json.dumps(as_record(entry), separators=(",", ":"), ensure_ascii=True,
                                             default=str)


def test_the_clock_formats_as_datetime_to_the_millisecond() -> None:
    clock = _Clock()
    rng = random.Random(7)
    stamps = [1714564800 + rng.random() * 200_000 for _ in range(5_000)]
    stamps += [1714564800 + k + f for k in range(3) for f in (0.0, 0.0005, 0.9994999, 0.9995, 0.9999994, 0.9999996)]
    stamps += [-1.5, -0.0004, -0.9999996]  # (before 1970: the fraction is negative)
    for ts in sorted(stamps) + stamps:  # in order (the cache kept) and out of order (changed every time)
        assert clock.iso(ts) == _iso(ts), ts


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (result_denied("denied by a/b"), "401 denied by a/b"),
        (result_upstream_failed("upstream refused"), "503 upstream refused"),
        (result_bad_request("authority 10.0.0.9:80 is not this pod"), "400 authority 10.0.0.9:80 is not this pod"),
    ],
)
def test_result_helpers(result: str, expected: str) -> None:
    assert result == expected


def test_writer_to_stream() -> None:
    out = io.StringIO()
    w = AccessLog(out)
    w.write(ENTRY)
    w.write(ENTRY)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and w.written == 2
    assert json.loads(lines[0])["result"] == "200"


def test_a_written_line_carries_the_time_meshctl_logs_since_reads() -> None:
    out = io.StringIO()
    AccessLog(out).write(ENTRY)
    t = logs.line_time(out.getvalue().encode())
    assert t == datetime.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


def test_writer_to_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.accesslog")
    with caplog.at_level(logging.INFO, logger="test.accesslog"):
        AccessLog(logger).write(ENTRY)
    assert [json.loads(r.getMessage())["source_workload"] for r in caplog.records] == ["sleep-1"]


def test_writer_can_be_switched_off() -> None:
    out = io.StringIO()
    on = [False]
    w = AccessLog(out, enabled=lambda: on[0])
    w.write(ENTRY)
    on[0] = True
    w.write(ENTRY)
    assert len(out.getvalue().splitlines()) == 1


def test_writer_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    out.close()
    w = AccessLog(out)
    with caplog.at_level(logging.WARNING, logger="nodeagent.accesslog"):
        w.write(ENTRY)
        w.write(ENTRY)
    assert w.written == 0
    assert len([r for r in caplog.records if "access log" in r.getMessage()]) == 1


def test_decision_fields() -> None:
    denied = Decision(False, "prod/deny", "denied by prod/deny", (PolicyMatch("prod/au", "AUDIT"),),
                      (PolicyMatch("prod/dr", "DENY", True),), False)
    e = AccessLogEntry(direction=INBOUND, start=0, duration=0, source=SRC, destination=DST, **decision_fields(denied))
    rec = json.loads(format_entry(e))
    assert rec["result"] == "401 denied by prod/deny"
    assert rec["policy"] == "prod/deny"
    assert rec["audited"] == ["prod/au"]
    assert rec["dry_run"] == ["prod/dr (DENY)"]
    allowed = Decision(True, None, "no policy applies")
    fields = decision_fields(allowed)
    assert "result" not in fields
    e = AccessLogEntry(direction=INBOUND, start=0, duration=0, source=SRC, destination=DST, result=RESULT_OK,
                       **fields)
    assert "policy" not in json.loads(format_entry(e))
