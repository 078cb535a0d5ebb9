"""How every mesh process logs: one text format, and log levels changed while the process runs.

Every component (control plane, node agent, waypoint, the local cluster's controller, the CNI installer)
writes one line per record on its standard output, in one format:

    2026-05-02 10:00:01,234 INFO nodeagent.enroll {"event": "enrolled", "pod": "bookinfo/sleep"}
    <date> <time,ms>        LEVEL LOGGER       MESSAGE

The time is the host's local time (the first two fields, which `line_time` reads back: `meshctl logs
--since` uses it); the message is a JSON object for events a program may want to read (`"event"` names
it) and plain text otherwise.  Levels: debug, info, warning, error.

The access log of the node agents and waypoints (one line per connection or request) is a record, not a
message: it is written between those lines as one JSON object per line, its UTC time first
(`{"time":"2026-05-02T10:00:01.234Z","direction":"inbound",...}`), as Envoy's JSON access log is, so
that `jq` reads it whole; `line_time` reads its time too.

Levels change at run time as ztunnel's `/logging` admin endpoint does (`mesh.serve.endpoints`): a spec
is a comma-separated list of `LEVEL` (every logger) and `LOGGER=LEVEL` items, e.g.
`info,nodeagent.proxy=debug`.  A spec is parsed whole before anything changes (`parse_levels`), so a
mistake changes nothing.
"""

from __future__ import annotations

import datetime
import logging
import sys
from dataclasses import dataclass
from typing import TextIO

from mesh.errors import MeshError

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LEVELS = ("debug", "info", "warning", "error")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"  # what `logging` writes for %(asctime)s (milliseconds after the comma)
TIME_WIDTH = len("2026-05-02 10:00:01,234")
ACCESS_LOG_PREFIX = b'{"time":"'  # an access-log line: one compact JSON object, its UTC time first

_configured = {"level": logging.INFO}  # the level the process started with: what `reset` goes back to


class LogLevelError(MeshError):
    """A log level spec that cannot be applied."""


@dataclass(frozen=True)
class LevelChange:
    logger: str  # "" is every logger (the root)
    level: int


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Log records at `level` and above to `stream` (standard output) in `FORMAT`; once per process."""
    value = level_value(level)
    _configured["level"] = value
    logging.basicConfig(level=value, stream=stream or sys.stdout, format=FORMAT)


def level_value(name: str) -> int:
    if name.lower() not in LEVELS:
        raise LogLevelError(f"unknown log level {name!r}: use one of {', '.join(LEVELS)}")
    return int(getattr(logging, name.upper()))


def parse_levels(spec: str) -> list[LevelChange]:
    """`info,nodeagent.proxy=debug` -> the changes it asks for (LogLevelError saying which item is wrong)."""
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise LogLevelError(f"empty log level spec {spec!r}: give LEVEL or LOGGER=LEVEL, comma-separated, "
                            "e.g. debug or info,nodeagent.proxy=debug")
    changes = []
    for item in items:
        logger, sep, level = item.rpartition("=")
        if sep and not logger.strip():
            raise LogLevelError(f"{item!r}: a logger name is missing before '='")
        try:
            changes.append(LevelChange(logger.strip(), level_value(level.strip())))
        except LogLevelError as exc:
            raise LogLevelError(f"{item!r}: {exc}") from None
    return changes


def apply_levels(changes: list[LevelChange]) -> None:
    for change in changes:
        logging.getLogger(change.logger or None).setLevel(change.level)


def reset_levels() -> None:
    """Back to the level the process started with, every logger following it again."""
    logging.getLogger().setLevel(_configured["level"])
    for logger in _loggers():
        logger.setLevel(logging.NOTSET)


def current_levels() -> dict[str, str]:
    """The root's level (key "") and every logger that has its own."""
    out = {"": logging.getLevelName(logging.getLogger().level).lower()}
    for logger in _loggers():
        if logger.level != logging.NOTSET:
            out[logger.name] = logging.getLevelName(logger.level).lower()
    return out


def _loggers() -> list[logging.Logger]:
    return [x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)]


def line_time(line: bytes) -> datetime.datetime | None:
    """The time a log line in `FORMAT` starts with, or an access-log line's `"time"` (local, naive), or
    None for a line without one."""
    if line.startswith(ACCESS_LOG_PREFIX):
        end = line.find(b'"', len(ACCESS_LOG_PREFIX))
        try:
            stamp = line[len(ACCESS_LOG_PREFIX):end].decode("ascii").replace("Z", "+00:00")
            return datetime.datetime.fromisoformat(stamp).astimezone().replace(tzinfo=None)
        except (UnicodeDecodeError, ValueError):
            return None
    head = line[:TIME_WIDTH]
    if len(head) < TIME_WIDTH or not head[:1].isdigit():
        return None
    try:
        return datetime.datetime.strptime(head.decode("ascii"), TIME_FORMAT)
    except (UnicodeDecodeError, ValueError):
        return None
