from __future__ import annotations

import pytest

from tests.unit.daemonset.manifests import DAEMONSET, WAYPOINT, Obj, render


@pytest.fixture(scope="session")
def base() -> list[Obj]:
    """`kubectl kustomize daemonset/`."""
    return render(DAEMONSET)


@pytest.fixture(scope="session")
def waypoint_example() -> list[Obj]:
    """`kubectl kustomize daemonset/waypoint/`."""
    return render(WAYPOINT)
