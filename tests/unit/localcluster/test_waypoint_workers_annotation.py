"""A waypoint Gateway's worker processes (`localcluster.waypoints.workers`): the annotation, or 1."""

from __future__ import annotations

from typing import Any

import pytest

from localcluster.waypoints import MAX_WORKERS, WORKERS_ANNOTATION, desired, workers
from mesh.api.kinds_gateway import waypoint_gateway
from waypoint.options import MAX_WORKERS as WAYPOINT_MAX_WORKERS


def gateway(value: Any = None) -> dict[str, Any]:
    body = waypoint_gateway("bookinfo")
    if value is not None:
        body["spec"]["infrastructure"] = {"annotations": {WORKERS_ANNOTATION: value}}
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
