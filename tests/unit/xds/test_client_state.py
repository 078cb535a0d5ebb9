"""The client side of delta xDS without sockets: responses in, ACK/NACK and updates out."""

from __future__ import annotations

import random

from envoy.service.discovery.v3 import discovery_pb2 as xds

from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.client import backoff_delay
from mesh.xds.client_state import ClientState
from mesh.xds.node import NodeInfo

W = rs.WORKLOAD


def response(nonce: str, *msgs: pb.Workload, removed: tuple[str, ...] = (), version: str = "v1") -> xds.DeltaDiscoveryResponse:
    resp = xds.DeltaDiscoveryResponse(type_url=W, nonce=nonce, system_version_info=version, removed_resources=list(removed))
    for m in msgs:
        packed = rs.pack(m)
        r = resp.resources.add(name=rs.name_of(m), version=rs.version_of(packed))
        r.resource.CopyFrom(packed)
    return resp


def state() -> ClientState:
    return ClientState(node=NodeInfo(id="n", role="nodeagent", node="n1"), subscriptions={W: None, rs.SERVICE: ["default/x"]})


A = pb.Workload(uid="default/a", addresses=["10.0.0.1"])
B = pb.Workload(uid="default/b", addresses=["10.0.0.2"])


def test_initial_requests_carry_node_once_and_subscriptions() -> None:
    reqs = state().initial_requests()
    assert [r.type_url for r in reqs] == [W, rs.SERVICE]
    assert reqs[0].node.id == "n" and not reqs[1].HasField("node")
    assert list(reqs[0].resource_names_subscribe) == ["*"]
    assert list(reqs[1].resource_names_subscribe) == ["default/x"]


def test_commit_acks_and_applies_removals() -> None:
    s = state()
    ack = s.commit(s.on_response(response("1", A, B)))
    assert ack.response_nonce == "1" and not ack.HasField("error_detail")
    assert set(s.resources(W)) == {"default/a", "default/b"}
    cand = s.on_response(response("2", removed=("default/b",), version="v2"))
    assert set(cand.update.resources) == {"default/a"} and cand.update.removed == ("default/b",)
    s.commit(cand)
    assert set(s.resources(W)) == {"default/a"} and s.acked_version[W] == "v2"


def test_reject_keeps_last_good_and_nacks() -> None:
    s = state()
    s.commit(s.on_response(response("1", A)))
    bad = pb.Workload(uid="default/a", addresses=["bad"])
    nack = s.reject(s.on_response(response("2", bad, version="v2")), "bad address")
    assert nack.error_detail.message == "bad address" and nack.response_nonce == "2"
    assert list(s.resources(W)["default/a"].addresses) == ["10.0.0.1"]  # type: ignore[attr-defined]
    assert s.acked_version[W] == "v1" and s.nacks == 1


def test_undecodable_or_unsubscribed_responses_are_errors() -> None:
    s = state()
    resp = response("1", A)
    resp.resources[0].resource.type_url = rs.SERVICE
    assert "is not a" in s.on_response(resp).error
    other = xds.DeltaDiscoveryResponse(type_url=rs.L7_CONFIG, nonce="2")
    assert "not subscribed" in s.on_response(other).error


def test_resume_sends_held_versions() -> None:
    s = state()
    s.commit(s.on_response(response("1", A, B)))
    again = s.initial_requests()[0]
    assert dict(again.initial_resource_versions) == {
        "default/a": rs.version_of(rs.pack(A)),
        "default/b": rs.version_of(rs.pack(B)),
    }
    assert s.synced == set()


def test_backoff_grows_with_jitter_and_caps() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 8.0, rng) for a in range(8)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 8.0 for d in delays) and delays[-1] >= 4.0
    assert len({round(d, 6) for d in delays}) == len(delays)
