"""`mesh.logs` (the one log format, level specs) and the admin endpoint's `/logging` and `/version`."""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import logging
from collections.abc import Iterator

import pytest

from mesh import logs
from mesh.serve.endpoints import admin_handler
from mesh.serve.routes import Request


@pytest.fixture
def levels() -> Iterator[None]:
    """Whatever a test changes, the process's loggers are as they were afterwards."""
    root = logging.getLogger()
    before = root.level, {n: lg.level for n, lg in logging.Logger.manager.loggerDict.items()
                          if isinstance(lg, logging.Logger)}
    yield
    root.setLevel(before[0])
    for name, level in before[1].items():
        logging.getLogger(name).setLevel(level)
    for name, lg in logging.Logger.manager.loggerDict.items():
        if isinstance(lg, logging.Logger) and name not in before[1]:
            lg.setLevel(logging.NOTSET)


def test_parse_levels() -> None:
    assert logs.parse_levels("debug") == [logs.LevelChange("", logging.DEBUG)]
    assert logs.parse_levels("info, nodeagent.proxy=DEBUG") == [logs.LevelChange("", logging.INFO),
                                                                logs.LevelChange("nodeagent.proxy", logging.DEBUG)]


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty log level spec"),
    ("info,", "empty log level spec"),
    ("loud", "'loud': unknown log level 'loud': use one of debug, info, warning, error"),
    ("info,x=loud", "'x=loud': unknown log level"),
    ("=debug", "'=debug': a logger name is missing before '='"),
])
def test_parse_levels_refuses(spec: str, message: str) -> None:
    with pytest.raises(logs.LogLevelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        logs.parse_levels(spec)


def test_format_lines_carry_a_time_line_time_reads() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    record = logging.LogRecord("nodeagent.enroll", logging.INFO, __file__, 1, '{"event": "enrolled"}', None, None)
    line = handler.format(record)
    date, clock, level, name, message = line.split(" ", 4)
    assert (level, name, message) == ("INFO", "nodeagent.enroll", '{"event": "enrolled"}')
    t = logs.line_time(line.encode())
    assert t is not None and abs((t - datetime.datetime.fromtimestamp(record.created)).total_seconds()) < 0.002
    assert logs.line_time(b"Traceback (most recent call last):") is None
    access = logs.line_time(b'{"time":"2026-05-02T10:00:01.234Z","direction":"inbound"}')
    assert access == datetime.datetime(2026, 5, 2, 10, 0, 1, 234000, tzinfo=datetime.UTC).astimezone().replace(
        tzinfo=None)
    assert logs.line_time(b'{"time":"yesterday"}') is None
    assert logs.line_time(b"2026-13-40 99:00:00,000 INFO x y") is None
    assert logs.line_time(b"") is None


def test_logging_endpoint_shows_changes_and_resets(levels: None) -> None:
    admin = admin_handler("test admin", {})
    logging.getLogger().setLevel(logging.INFO)
    logs._configured["level"] = logging.INFO
    answer = admin(Request.parse("POST", "/logging?level=warning,test.cli.proxy=debug"))
    assert answer.status == 200
    assert json.loads(answer.body)["levels"] == {"": "warning", "test.cli.proxy": "debug"}
    assert logging.getLogger("test.cli.proxy").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("test.cli.other").isEnabledFor(logging.INFO)
    assert json.loads(admin(Request.parse("GET", "/logging")).body)["levels"]["test.cli.proxy"] == "debug"
    answer = admin(Request.parse("POST", "/logging?reset"))
    assert json.loads(answer.body)["levels"] == {"": "info"}
    assert not logging.getLogger("test.cli.proxy").isEnabledFor(logging.DEBUG)


def test_logging_endpoint_refuses_bad_specs_whole_and_remote_callers(levels: None) -> None:
    admin = admin_handler("test admin", {})
    logging.getLogger().setLevel(logging.INFO)
    answer = admin(Request.parse("POST", "/logging?level=test.cli.a=debug,loud"))
    assert answer.status == 400 and b"'loud': unknown log level" in answer.body
    assert logging.getLogger("test.cli.a").level == logging.NOTSET  # the good item was not applied either
    assert admin(Request.parse("POST", "/logging")).status == 400
    assert admin(Request.parse("POST", "/logging?level=debug", local=False)).status == 403
    assert logging.getLogger().level == logging.INFO
    assert admin(Request.parse("DELETE", "/logging")).status == 405


def test_version_endpoint_says_what_runs() -> None:
    info = json.loads(admin_handler("test admin", {})(Request.parse("GET", "/version")).body)
    assert set(info) == {"version", "python", "pid", "started"}
    assert info["version"] == importlib.metadata.version("ambient-mesh")
    datetime.datetime.fromisoformat(info["started"])
