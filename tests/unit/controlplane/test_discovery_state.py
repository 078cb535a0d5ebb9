"""The per-stream delta xDS state machine, driven by scripted requests (no sockets)."""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2 as xds

from controlplane.discovery.filter import view
from controlplane.discovery.state import Acked, Nacked, ProtocolError, Push, Snapshot, StreamState
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.node import NodeInfo

W = rs.WORKLOAD


def workload(name: str, ip: str, node: str = "n1") -> pb.Workload:
    return pb.Workload(uid=f"default/{name}", name=name, namespace="default", addresses=[ip], node=node)


def snap(version: str, *msgs: object) -> Snapshot:
    res: dict[str, dict[str, tuple[str, object]]] = {}
    for m in msgs:
        a = rs.pack(m)  # type: ignore[arg-type]
        res.setdefault(a.type_url, {})[rs.name_of(m)] = (rs.version_of(a), a)  # type: ignore[arg-type]
    return Snapshot(version=version, resources=res)  # type: ignore[arg-type]


def req(type_url: str = W, nonce: str = "", error: str = "", **kw: object) -> xds.DeltaDiscoveryRequest:
    r = xds.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce, **kw)  # type: ignore[arg-type]
    r.node.CopyFrom(NodeInfo(id="nodeagent~n1~n1.", role="nodeagent", node="n1").to_proto())
    if error:
        r.error_detail.code = 3
        r.error_detail.message = error
    return r


def only_push(out: list) -> Push:
    pushes = [o for o in out if isinstance(o, Push)]
    assert len(pushes) == 1, out
    return pushes[0]


A, B = workload("a", "10.0.0.1"), workload("b", "10.0.0.2")


def test_first_request_needs_node_id() -> None:
    s = StreamState(view)
    with pytest.raises(ProtocolError):
        s.receive(xds.DeltaDiscoveryRequest(type_url=W), snap("1"))


def test_wildcard_subscribe_sends_everything_then_only_changes() -> None:
    s = StreamState(view, nonce_prefix="t")
    p = only_push(s.receive(req(), snap("1", A, B)))
    assert [u[0] for u in p.updated] == ["default/a", "default/b"] and p.version == "1"
    assert s.receive(req(nonce=p.nonce), snap("1", A, B)) == [Acked(W, p.nonce, "1")]
    a2 = workload("a", "10.0.0.9")
    p2 = only_push(s.on_snapshot(snap("2", a2, B), {W: ["default/a"]}))
    assert [u[0] for u in p2.updated] == ["default/a"] and not p2.removed
    # Removal
    p3 = only_push(s.on_snapshot(snap("3", a2), None))
    assert p3.removed == ("default/b",) and not p3.updated
    assert s.on_snapshot(snap("3", a2), None) == []


def test_empty_first_subscription_still_answers() -> None:
    s = StreamState(view)
    p = only_push(s.receive(req(), snap("1")))
    assert p.updated == () and p.removed == ()


def test_explicit_subscribe_and_unsubscribe() -> None:
    s = StreamState(view)
    p = only_push(s.receive(req(resource_names_subscribe=["default/b"]), snap("1", A, B)))
    assert [u[0] for u in p.updated] == ["default/b"]
    s.receive(req(nonce=p.nonce), snap("1", A, B))
    p2 = only_push(s.receive(req(resource_names_subscribe=["default/a"]), snap("1", A, B)))
    assert [u[0] for u in p2.updated] == ["default/a"]
    out = s.receive(req(resource_names_unsubscribe=["default/a", "default/b"]), snap("1", A, B))
    assert [o for o in out if isinstance(o, Push)] == [] or only_push(out).updated == ()
    # Unsubscribed resources no longer follow changes.
    assert s.on_snapshot(snap("2", workload("a", "10.9.9.9"), B), None) == []


def test_nack_is_recorded_and_not_resent_until_content_changes() -> None:
    s = StreamState(view)
    p = only_push(s.receive(req(), snap("1", A)))
    s.receive(req(nonce=p.nonce), snap("1", A))
    bad = workload("a", "not-an-ip")
    p2 = only_push(s.on_snapshot(snap("2", bad), None))
    out = s.receive(req(nonce=p2.nonce, error="bad address"), snap("2", bad))
    assert out == [Nacked(W, p2.nonce, "2", "bad address", ("default/a",))]
    st = s.status()[W]
    assert st["acked_version"] == "1" and st["nack"]["error"] == "bad address"  # type: ignore[index]
    # Same content again (another unrelated change): not resent.
    assert s.on_snapshot(snap("3", bad), None) == []
    # New content: sent, and once ACKed the NACK is cleared.
    good = workload("a", "10.0.0.7")
    p3 = only_push(s.on_snapshot(snap("4", good), None))
    assert [u[0] for u in p3.updated] == ["default/a"]
    s.receive(req(nonce=p3.nonce), snap("4", good))
    assert s.status()[W]["nack"] is None and s.status()[W]["acked_version"] == "4"


def test_nack_reverts_to_acked_version_so_old_content_is_resent() -> None:
    s = StreamState(view)
    p = only_push(s.receive(req(), snap("1", A)))
    s.receive(req(nonce=p.nonce), snap("1", A))
    bad = workload("a", "bad")
    p2 = only_push(s.on_snapshot(snap("2", bad), None))
    s.receive(req(nonce=p2.nonce, error="no"), snap("2", bad))
    # The operator reverts the change: the client already has that version, nothing to send.
    assert s.on_snapshot(snap("3", A), None) == []


def test_resume_sends_only_what_differs() -> None:
    s = StreamState(view)
    a_any = rs.pack(A)
    initial = {"default/a": rs.version_of(a_any), "default/gone": "v0", "default/b": "old"}
    p = only_push(s.receive(req(initial_resource_versions=initial), snap("5", A, B)))
    assert [u[0] for u in p.updated] == ["default/b"]
    assert p.removed == ("default/gone",)


def test_stale_nonce_is_ignored() -> None:
    s = StreamState(view)
    s.receive(req(), snap("1", A))
    assert s.receive(req(nonce="nope"), snap("1", A)) == []


def test_waypoint_gets_only_its_l7_config() -> None:
    mine = pb.L7Config(kind=pb.VIRTUAL_SERVICE, name="r", namespace="ns", waypoints=["ns/wp"])
    other = pb.L7Config(kind=pb.VIRTUAL_SERVICE, name="o", namespace="ns", waypoints=["ns/other"])
    s = StreamState(view)
    r = xds.DeltaDiscoveryRequest(type_url=rs.L7_CONFIG)
    r.node.CopyFrom(NodeInfo(id="w", role="waypoint", namespace="ns", name="wp").to_proto())
    p = only_push(s.receive(r, snap("1", mine, other)))
    assert [u[0] for u in p.updated] == ["VirtualService/ns/r"]


def test_nodeagent_gets_no_l7_config() -> None:
    cfg = pb.L7Config(kind=pb.DESTINATION_RULE, name="r", namespace="ns", waypoints=["ns/wp"])
    s = StreamState(view)
    p = only_push(s.receive(req(type_url=rs.L7_CONFIG), snap("1", cfg)))
    assert p.updated == ()


def test_push_to_response() -> None:
    s = StreamState(view, nonce_prefix="x")
    p = only_push(s.receive(req(), snap("1", A)))
    resp = p.to_response()
    assert resp.nonce == "x-1" and resp.type_url == W and resp.system_version_info == "1"
    got = pb.Workload()
    assert resp.resources[0].resource.Unpack(got) and got.addresses == ["10.0.0.1"]


def test_a_snapshot_before_the_first_request_does_not_hide_resources() -> None:
    """A push may reach a stream before its first request names the client: what the client may have
    is worked out for the client, once it is known."""
    s = StreamState(view)
    current = snap("1", A, B)
    assert s.on_snapshot(current, {W: ["default/a"]}) == []
    p = only_push(s.receive(req(), current))
    assert [u[0] for u in p.updated] == ["default/a", "default/b"]
