"""HTTPRoute status on Kubernetes: the Kubernetes source watches routes, and the control plane writes their
`status.parents` through the real `kubernetes` client to the stand-in API server, keeping other
controllers' entries and the transition time of a condition that did not change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_apiserver
import pytest
from fake_apiserver import FakeApiServer
from kube_objects import namespace, service, waypoint

from controlplane.config.kubernetes import KubernetesSource, Timing, api_client
from controlplane.config.kuberoutes import with_times
from controlplane.config.store import Store

pytestmark = pytest.mark.timeout(30)
FAST = Timing(backoff_initial=0.05, backoff_max=0.2, watch_timeout=5, request_timeout=2.0)
GROUP = "gateway.networking.k8s.io"
OTHER = {"parentRef": {"name": "ingress"}, "controllerName": "example.com/another-controller",
         "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    monkeypatch.setitem(fake_apiserver.COLLECTIONS, (GROUP, "v1", "httproutes"), ("HTTPRoute", True))
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def source(api: FakeApiServer, tmp_path: Path) -> Iterator[KubernetesSource]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    api.put(namespace("default", **{"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}))
    api.put(waypoint("waypoint"))
    api.put(service("reviews", vip="10.96.0.10", port=9080))
    api.put(service("reviews-v1", vip="10.96.0.11", port=9080))
    s = KubernetesSource(api_client(kubeconfig), Store(check_references=False), timing=FAST)
    s.start()
    s.wait_synced(5)
    yield s
    s.stop()


def http_route(backend: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": "default", "generation": 1},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
                     "rules": [{"backendRefs": [{"name": backend, "port": 9080}]}]},
            "status": {"parents": [OTHER]}}


def ours(api: FakeApiServer) -> dict[str, Any] | None:
    obj = api.get("HTTPRoute", "default", "reviews") or {}
    mine = [p for p in (obj.get("status") or {}).get("parents") or [] if p["controllerName"] == "istio.io/mesh-controller"]
    return mine[0] if mine else None


def conditions(parent: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in (parent or {}).get("conditions") or []}


def test_route_status_is_written_to_the_api(api: FakeApiServer, source: KubernetesSource) -> None:
    api.put(http_route("reviews-v1"))
    assert api.wait_for(lambda: conditions(ours(api)) == {"Accepted": ("True", "Accepted"),
                                                          "ResolvedRefs": ("True", "ResolvedRefs")})
    first = ours(api)
    assert first is not None and all(c["lastTransitionTime"] for c in first["conditions"])
    assert OTHER in api.get("HTTPRoute", "default", "reviews")["status"]["parents"]  # type: ignore[index]

    api.put(http_route("reviews-v9"))  # a backend that does not exist
    assert api.wait_for(lambda: conditions(ours(api)).get("ResolvedRefs") == ("False", "BackendNotFound"))
    now = ours(api)
    assert now is not None and "reviews-v9" in now["conditions"][1]["message"]
    assert OTHER in api.get("HTTPRoute", "default", "reviews")["status"]["parents"]  # type: ignore[index]
    assert "HTTPRoute/default/reviews" in {str(r) for r in source.store.snapshot()}


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    def status(resolved: str) -> dict[str, Any]:
        return {"parents": [{"parentRef": {"name": "reviews"}, "controllerName": "c", "conditions": [
            {"type": "Accepted", "status": "True"}, {"type": "ResolvedRefs", "status": resolved}]}]}

    first = with_times(status("True"), None, "T1")
    second = with_times(status("False"), first, "T2")
    times = [c["lastTransitionTime"] for c in second["parents"][0]["conditions"]]
    assert times == ["T1", "T2"]
