"""A waypoint Gateway's drain time (`localcluster.waypoints.drain_seconds`) and what the controller starts
the waypoint with."""

from __future__ import annotations

from typing import Any

import pytest

from localcluster.waypoints import (
    DEFAULT_DRAIN_SECONDS,
    DRAIN_ANNOTATION,
    desired,
    drain_seconds,
    probed,
    ready_condition,
)
from mesh.api.kinds_gateway import waypoint_gateway


def gateway(value: Any = None) -> dict[str, Any]:
    body = waypoint_gateway("bookinfo")
    if value is not None:
        body["spec"]["infrastructure"] = {"annotations": {DRAIN_ANNOTATION: value}}
    return body


def test_drain_time_from_the_gateway() -> None:
    assert drain_seconds(gateway()) == DEFAULT_DRAIN_SECONDS
    assert drain_seconds(gateway("7.5")) == 7.5
    assert drain_seconds(gateway("0")) == 0.0
    assert desired([gateway("12")])["bookinfo/waypoint"].drain_seconds == 12.0


@pytest.mark.parametrize("bad", ["soon", "-1", "301", "nan", ""])
def test_a_bad_drain_time_is_logged_and_the_default_used(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    assert drain_seconds(gateway(bad)) == DEFAULT_DRAIN_SECONDS
    assert f"{DRAIN_ANNOTATION}={bad!r} is not a number of seconds from 0 to 300" in caplog.text


def test_ready_condition() -> None:
    assert ready_condition(True) == {"type": "Ready", "status": "True"}
    assert ready_condition(False) == {"type": "Ready", "status": "False"}


def test_readiness_needs_one_success_and_is_lost_after_three_failures() -> None:
    assert probed(False, True, 0) == (True, 0)
    assert probed(False, False, 0) == (False, 1)
    state = (True, 0)
    for _ in range(2):  # a busy waypoint that answers late once or twice keeps its traffic
        state = probed(state[0], False, state[1])
        assert state[0]
    assert probed(state[0], False, state[1]) == (False, 3)
    assert probed(True, True, 2) == (True, 0)


def test_a_gateway_with_addresses_is_deployed_by_its_user() -> None:
    """Istio's manual deployment: `spec.addresses` set, no waypoint pod is made for the Gateway."""
    manual = gateway()
    manual["spec"]["addresses"] = [{"type": "Hostname", "value": "waypoint.bookinfo.svc.cluster.local"}]
    other = waypoint_gateway("shop")
    assert sorted(desired([manual, other])) == ["shop/waypoint"]
    manual["spec"]["addresses"] = []  # an empty list asks for nothing: deployed as usual
    assert sorted(desired([manual, other])) == ["bookinfo/waypoint", "shop/waypoint"]
