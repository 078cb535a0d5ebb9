"""A mesh view built the way the agent gets it: cluster objects -> control plane translation -> state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.config.source import Snapshot
from controlplane.translate.snapshot import translate_snapshot
from localcluster import plan, spec
from localcluster.registration import cluster_objects
from mesh.api.validate import Ref
from nodeagent.state import AUTHORIZATION, SERVICE, WORKLOAD, MeshState

BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo" / "cluster.yaml"


def build_state(extra: list[dict[str, Any]] = (), labels: dict[str, dict[str, str]] | None = None) -> MeshState:  # type: ignore[assignment]
    s = spec.load(BOOKINFO)
    bodies = cluster_objects(s, plan.make_plan(s)) + list(extra)
    for body in bodies:
        ref = f"{body['kind']}/{body['metadata'].get('namespace', '')}/{body['metadata']['name']}"
        for key, value in (labels or {}).get(ref, {}).items():
            body["metadata"].setdefault("labels", {})[key] = value
    snapshot = Snapshot(1, {Ref.of(b): b for b in bodies})
    t = translate_snapshot(snapshot)
    state = MeshState()
    state.apply(WORKLOAD, t.workloads, ())
    state.apply(SERVICE, t.services, ())
    state.apply(AUTHORIZATION, t.authorizations, ())
    return state



@pytest.fixture
def mesh_state() -> Callable[..., MeshState]:
    return build_state
