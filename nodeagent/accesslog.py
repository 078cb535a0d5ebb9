"""One structured access-log line per proxied connection.

The proxy fills an `AccessLogEntry` when a connection ends (or is refused); `format_entry()` turns it
into one JSON object on one line, and `AccessLog` writes that line to a logger or a text stream.
Keys are flat so that `grep` and `jq` both work:

    {"time":"2024-05-01T12:00:00.123Z","direction":"inbound","result":"200","duration_ms":12.5,
     "source_address":"10.244.1.3:40112","source_workload":"sleep-1","source_namespace":"default",
     "source_principal":"spiffe://cluster.local/ns/default/sa/sleep",
     "destination_address":"10.244.2.5:8080","destination_workload":"web-1",...,
     "destination_service":"web.prod.svc.cluster.local","bytes_sent":512,"bytes_received":78,
     "connection_security_policy":"mutual_tls"}

`bytes_received` counts what came from the client, `bytes_sent` what went back to it (as the TCP
metrics do).  `result` reads like an HTTP status, since HBONE answers CONNECT with one: "200" for a
connection carried to the end, "401 denied by <ns>/<name>", "503 upstream refused", and so on.
Optional keys (`policy`, `audited`, `dry_run`, `error`) appear only when they have a value.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _text
from typing import Any, TextIO

from mesh.policy.evaluator import Decision

log = logging.getLogger(__name__)

INBOUND = "inbound"
OUTBOUND = "outbound"

RESULT_OK = "200"


def result_of(status: int, detail: str) -> str:
    """`<status> <detail>`: how a connection that was not carried reads in the log."""
    return f"{status} {detail}"


def result_denied(reason: str) -> str:
    """`401 <reason>`, e.g. from `Decision.reason`: "401 denied by prod/deny-sleep"."""
    return result_of(401, reason)


def result_upstream_failed(detail: str) -> str:
    """`503 <detail>`, e.g. "503 upstream refused", "503 no healthy endpoint"."""
    return result_of(503, detail)


def result_bad_request(detail: str) -> str:
    return result_of(400, detail)


@dataclass(frozen=True)
class Peer:
    """One end of a connection as the log shows it; empty strings are written as "unknown"."""

    ip: str = ""
    port: int = 0
    workload: str = ""
    namespace: str = ""
    principal: str = ""

    @property
    def address(self) -> str:
        if not self.ip:
            return "unknown"
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class AccessLogEntry:
    direction: str  # INBOUND or OUTBOUND
    start: float  # Unix time the connection was accepted
    duration: float  # seconds
    source: Peer
    destination: Peer
    result: str
    destination_service: str = ""
    bytes_sent: int = 0  # towards the client
    bytes_received: int = 0  # from the client
    connection_security_policy: str = "unknown"  # "mutual_tls" or "none"
    policy: str = ""  # the authorization policy that decided, if one did
    audited: tuple[str, ...] = field(default=())  # AUDIT policies that matched
    dry_run: tuple[str, ...] = field(default=())  # dry-run policies that matched, "ns/name (ACTION)"
    error: str = ""  # details of a failure, for operators


def decision_fields(decision: Decision) -> dict[str, Any]:
    """The entry fields an authorization decision fills: `AccessLogEntry(..., **decision_fields(d))`
    after the other fields (its `result` is set only for a denial; pass `result=` otherwise)."""
    out: dict[str, Any] = {
        "policy": decision.policy or "",
        "audited": tuple(m.policy for m in decision.audited),
        "dry_run": tuple(f"{m.policy} ({m.action})" for m in decision.dry_run),
    }
    if decision.denied:
        out["result"] = result_denied(decision.reason)
    return out


def _iso(ts: float) -> str:
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class _Clock:
    """`_iso(ts)` with the date and time to the second formatted once a second (a line per connection;
    `strftime` is most of `_iso`'s cost).  Microseconds rounded as `datetime.fromtimestamp` rounds them
    (half to even, a carry into the second), so that the two agree to the millisecond.  The second and
    its text are one tuple, read and replaced whole: both threads of an agent write lines."""

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached = (-1, "")

    def iso(self, ts: float) -> str:
        fraction, whole = math.modf(ts)
        micros = round(fraction * 1e6)
        second = int(whole)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:  # (before 1970)
            second, micros = second - 1, micros + 1_000_000
        cached = self.cached
        if cached[0] != second:
            cached = self.cached = (second, _iso(second)[:-4])  # "YYYY-MM-DDTHH:MM:SS."
        return f"{cached[1]}{micros // 1000:03d}Z"


_CLOCK = _Clock()


def _or_unknown(value: str) -> str:
    return value or "unknown"


def as_record(e: AccessLogEntry) -> dict[str, object]:
    """The entry as the flat dict that is written (keys in a fixed, readable order)."""
    rec: dict[str, object] = {
        "time": _iso(e.start),
        "direction": e.direction,
        "result": e.result,
        "duration_ms": round(max(e.duration, 0.0) * 1000, 3),
        "source_address": e.source.address,
        "source_workload": _or_unknown(e.source.workload),
        "source_namespace": _or_unknown(e.source.namespace),
        "source_principal": _or_unknown(e.source.principal),
        "destination_address": e.destination.address,
        "destination_workload": _or_unknown(e.destination.workload),
        "destination_namespace": _or_unknown(e.destination.namespace),
        "destination_principal": _or_unknown(e.destination.principal),
        "destination_service": _or_unknown(e.destination_service),
        "bytes_sent": e.bytes_sent,
        "bytes_received": e.bytes_received,
        "connection_security_policy": e.connection_security_policy,
    }
    if e.policy:
        rec["policy"] = e.policy
    if e.audited:
        rec["audited"] = list(e.audited)
    if e.dry_run:
        rec["dry_run"] = list(e.dry_run)
    if e.error:
        rec["error"] = e.error
    return rec


def format_entry(e: AccessLogEntry) -> str:
    """One line of JSON, without the newline.  Never raises for any entry.

    The line is `json.dumps(as_record(e), separators=(",", ":"), ensure_ascii=True, default=str)` byte for
    byte, written out field by field (each string escaped by the encoder's own C function): a third of
    the encoder's time, which builds the dict and dispatches on every value's type.  An entry whose
    values are not the declared types (a test's, say) goes to the encoder."""
    src, dst = e.source, e.destination
    try:
        if type(e.bytes_sent) is not int or type(e.bytes_received) is not int:
            raise TypeError
        duration = round(max(e.duration, 0.0) * 1000, 3)
        if not math.isfinite(duration):
            raise ValueError
        line = (f'{{"time":"{_CLOCK.iso(e.start)}","direction":{_text(e.direction)},"result":{_text(e.result)},'
                f'"duration_ms":{duration!r},'
                f'"source_address":{_text(src.address)},"source_workload":{_text(src.workload or "unknown")},'
                f'"source_namespace":{_text(src.namespace or "unknown")},'
                f'"source_principal":{_text(src.principal or "unknown")},'
                f'"destination_address":{_text(dst.address)},'
                f'"destination_workload":{_text(dst.workload or "unknown")},'
                f'"destination_namespace":{_text(dst.namespace or "unknown")},'
                f'"destination_principal":{_text(dst.principal or "unknown")},'
                f'"destination_service":{_text(e.destination_service or "unknown")},'
                f'"bytes_sent":{e.bytes_sent},"bytes_received":{e.bytes_received},'
                f'"connection_security_policy":{_text(e.connection_security_policy)}')
        if e.policy or e.audited or e.dry_run or e.error:
            line += _optional(e)
        return line + "}"
    except (TypeError, ValueError, OverflowError):  # (`_text` of a non-str; a duration not finite)
        return json.dumps(as_record(e), separators=(",", ":"), ensure_ascii=True, default=str)


def _optional(e: AccessLogEntry) -> str:
    out = f',"policy":{_text(e.policy)}' if e.policy else ""
    if e.audited:
        out += ',"audited":[' + ",".join(_text(x) for x in e.audited) + "]"
    if e.dry_run:
        out += ',"dry_run":[' + ",".join(_text(x) for x in e.dry_run) + "]"
    if e.error:
        out += f',"error":{_text(e.error)}'
    return out


class AccessLog:
    """Writes entries to a logger (at INFO) or to a text stream (one line each, flushed).

    A failure to write (a closed pipe, a full disk) is reported once on the module's logger and
    otherwise ignored: losing a log line must never break a connection.
    """

    def __init__(self, sink: logging.Logger | TextIO, *, enabled: Callable[[], bool] | None = None) -> None:
        self._sink = sink
        self._enabled = enabled
        self._failed = False
        self.written = 0

    def write(self, entry: AccessLogEntry) -> None:
        if self._enabled is not None and not self._enabled():
            return
        line = format_entry(entry)
        try:
            if isinstance(self._sink, logging.Logger):
                self._sink.info(line)
            else:
                self._sink.write(line + "\n")
                self._sink.flush()
        except (OSError, ValueError) as exc:  # ValueError: write to a closed file
            if not self._failed:
                self._failed = True
                log.warning("access log cannot be written (%s); further failures are not reported", exc)
            return
        self.written += 1
