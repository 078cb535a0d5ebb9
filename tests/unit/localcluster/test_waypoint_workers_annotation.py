"""A waypoint Gateway's worker processes (`localcluster.waypoints.workers`): the annotation, or 1; and its
engine (`localcluster.waypoints.engine`): the annotation, or the waypoint's default."""

from __future__ import annotations

from typing import Any

import pytest

from localcluster.waypoints import (
    ENGINE_ANNOTATION,
    MAX_WORKERS,
    WORKERS_ANNOTATION,
    desired,
    engine,
    workers,
)
from mesh.api.kinds_gateway import waypoint_gateway
from waypoint.options import ENGINES, Options
from waypoint.options import MAX_WORKERS as WAYPOINT_MAX_WORKERS


def gateway(value: Any = None, annotation: str = WORKERS_ANNOTATION) -> dict[str, Any]:
    body = waypoint_gateway("bookinfo")
    if value is not None:
        body["spec"]["infrastructure"] = {"annotations": {annotation: value}}
    return body


def test_workers_from_the_gateway() -> None:
    assert workers(gateway()) == 1  # the local cluster shares its cores among all pods: one process
    assert workers(gateway("2")) == 2
    assert desired([gateway("3")])["bookinfo/waypoint"].workers == 3
    assert MAX_WORKERS == WAYPOINT_MAX_WORKERS


@pytest.mark.parametrize("bad", ["two", "0", "-1", "9", "1.5", ""])
def test_a_bad_worker_count_is_logged_and_one_used(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    assert workers(gateway(bad)) == 1
    assert f"{WORKERS_ANNOTATION} {bad!r} is not a whole number from 1 to 8; running 1 worker" in caplog.text


def test_engine_from_the_gateway() -> None:
    assert engine(gateway()) == Options.engine == "uvloop"  # no annotation: the waypoint's own default
    assert engine(gateway("trio", ENGINE_ANNOTATION)) == "trio"
    assert engine(gateway("uvloop", ENGINE_ANNOTATION)) == "uvloop"
    assert desired([gateway("trio", ENGINE_ANNOTATION)])["bookinfo/waypoint"].engine == "trio"
    assert desired([gateway("2")])["bookinfo/waypoint"].engine == "uvloop"


@pytest.mark.parametrize("bad", ["epoll", "Trio", "", " trio", "1"])
def test_a_bad_engine_is_logged_and_the_default_used(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    assert engine(gateway(bad, ENGINE_ANNOTATION)) == "uvloop"
    assert f"{ENGINE_ANNOTATION} {bad!r} is not one of {', '.join(ENGINES)}; running uvloop" in caplog.text
