"""The authorization decision: who may have which identity."""

from __future__ import annotations

import pytest
from ca_helpers import SLEEP, WEB

from ca.auth import NodeAgent, Workload
from ca.errors import PermissionDeniedError, SANError
from ca.pods import InMemoryPodLocator, PodPlacement
from ca.policy import allowed_identity
from mesh.identity import SpiffeId

SLEEP_ID, WEB_ID = SpiffeId.parse(SLEEP), SpiffeId.parse(WEB)
TD = "cluster.local"


@pytest.fixture
def pods() -> InMemoryPodLocator:
    return InMemoryPodLocator([PodPlacement("default", "sleep-1", "sleep", "node-a")])


def test_node_agent_for_a_pod_on_its_node(pods: InMemoryPodLocator) -> None:
    assert allowed_identity(NodeAgent("node-a"), SLEEP_ID, SLEEP_ID, pods, TD) == SLEEP_ID


def test_node_agent_for_a_pod_on_another_node(pods: InMemoryPodLocator) -> None:
    with pytest.raises(PermissionDeniedError, match="scheduled on node 'node-b'"):
        allowed_identity(NodeAgent("node-b"), SLEEP_ID, SLEEP_ID, pods, TD)


def test_node_agent_must_impersonate(pods: InMemoryPodLocator) -> None:
    with pytest.raises(PermissionDeniedError, match="ImpersonatedIdentity"):
        allowed_identity(NodeAgent("node-a"), None, SLEEP_ID, pods, TD)


def test_node_agent_csr_must_match_impersonated_identity(pods: InMemoryPodLocator) -> None:
    with pytest.raises(SANError, match=f"CSR asks for {WEB}"):
        allowed_identity(NodeAgent("node-a"), SLEEP_ID, WEB_ID, pods, TD)


def test_pod_moves_away(pods: InMemoryPodLocator) -> None:
    pods.remove("default", "sleep-1")
    with pytest.raises(PermissionDeniedError):
        allowed_identity(NodeAgent("node-a"), SLEEP_ID, SLEEP_ID, pods, TD)
    pods.put(PodPlacement("default", "sleep-2", "sleep", "node-a"))
    assert allowed_identity(NodeAgent("node-a"), SLEEP_ID, SLEEP_ID, pods, TD) == SLEEP_ID


def test_workload_gets_only_itself(pods: InMemoryPodLocator) -> None:
    assert allowed_identity(Workload(WEB_ID), None, WEB_ID, pods, TD) == WEB_ID
    with pytest.raises(SANError, match="may only have"):
        allowed_identity(Workload(WEB_ID), None, SLEEP_ID, pods, TD)


def test_workload_may_not_impersonate(pods: InMemoryPodLocator) -> None:
    with pytest.raises(PermissionDeniedError, match="only node agents"):
        allowed_identity(Workload(WEB_ID), SLEEP_ID, SLEEP_ID, pods, TD)


def test_foreign_trust_domain(pods: InMemoryPodLocator) -> None:
    foreign = SpiffeId("evil.example", "default", "sleep")
    with pytest.raises(PermissionDeniedError, match="trust domain"):
        allowed_identity(NodeAgent("node-a"), foreign, foreign, pods, TD)
    with pytest.raises(PermissionDeniedError, match="trust domain"):
        allowed_identity(Workload(foreign), None, foreign, pods, TD)
