"""Item 12: a NACK never drops good resources with the bad one.

- One validator for both sides: what a waypoint would refuse to compile, the control plane refuses at
  apply (`jwks` with no usable key, a JWT rule with neither `jwks` nor `jwksUri`, ...); a null is "not
  set" on both sides (`maxEjectionPercent: null`).  Fuzzed: a document the validator accepts compiles at
  the waypoint without an error.
- The waypoint accepts per resource: one that does not compile is left out and reported (its config dump),
  the rest applied and ACKed; it NACKs only a response of which nothing could be applied.
- The control plane does not count a NACKed response's resources as sent: it sends them again in halves
  until the bad one is alone, so the good ones arrive, and only the bad one is remembered as rejected.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2 as xds
from hypothesis import HealthCheck, given, settings

from controlplane.app import ControlPlaneThread
from controlplane.config.store import Store
from controlplane.discovery.filter import view
from controlplane.discovery.source import MemorySource
from controlplane.discovery.state import Acked, Nacked, Push, Snapshot, StreamState
from controlplane.options import Options
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.errors import ValidationError
from mesh.api.loader import parse_text
from mesh.api.validate import Document, check_document
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.client_state import Update
from mesh.xds.errors import Rejected
from mesh.xds.node import NodeInfo
from tests.security.fuzzing import mutated
from tests.unit.waypoint.waypoint_resources import WAYPOINT, bookinfo, fq, l7
from waypoint.config import compile_table
from waypoint.discovery import WaypointConfig

RA = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
"""

DR_NULL_EJECTION = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, maxEjectionPercent: null}
"""

GATEWAY_TARGET = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]
DENY_DELETE = {"targetRefs": GATEWAY_TARGET, "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}
EMPTY_JWKS = {"targetRefs": GATEWAY_TARGET, "jwtRules": [{"issuer": "me", "jwks": '{"keys": []}'}]}


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


# ---- one validator -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "path", "says"), [
    ({"issuer": "me", "jwks": '{"keys": []}'}, "spec.jwtRules[0].jwks", "no usable key"),
    ({"issuer": "me", "jwks": '{"keys": [{}]}'}, "spec.jwtRules[0].jwks", "no usable key"),
    ({"issuer": "me"}, "spec.jwtRules[0]", "set jwks or jwksUri"),
])
def test_the_control_plane_refuses_jwt_rules_a_waypoint_would_refuse(rule: dict[str, Any], path: str,
                                                                      says: str) -> None:
    doc = parse_text(RA + f"  jwtRules: [{json.dumps(rule)}]\n", "ra.yaml")
    with pytest.raises(ValidationError) as info:
        Store().apply(doc)
    assert any(e.path == path and says in e.message for e in info.value.errors), info.value.lines()


def test_a_null_is_not_set_on_both_sides() -> None:
    store = Store()
    store.apply(parse_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}\n---\n" + DR_NULL_EJECTION, "dr.yaml"))  # the namespace must exist
    translation = translate_snapshot(store.snapshot())
    config = translation.l7["DestinationRule/bookinfo/reviews"]
    workloads, services = bookinfo()
    config.waypoints.append(WAYPOINT)
    result = compile_table(WAYPOINT, workloads, services, [config])
    assert result.errors == ()
    # A null that reaches a waypoint anyway (an older control plane) is "not set" there too.
    result = compile_table(WAYPOINT, workloads, services, [l7("DestinationRule", "reviews", {
        "host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3, "maxEjectionPercent": None}}},
        [fq("reviews")])])
    assert result.errors == ()
    assert result.table.destination_rules[fq("reviews")].policy.outlier.max_ejection_percent == 10  # type: ignore[union-attr]


L7_KINDS = ("VirtualService", "DestinationRule", "AuthorizationPolicy", "RequestAuthentication")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(L7_KINDS))
def test_what_the_control_plane_accepts_a_waypoint_compiles(doc: dict[str, Any]) -> None:
    body, errors = check_document(doc)
    if errors:
        return
    assert body is not None
    store = Store(check_references=False)
    store.apply([Document("fuzz.yaml", 1, doc)])
    translation = translate_snapshot(store.snapshot())
    configs = list(translation.l7.values())
    for config in configs:
        del config.waypoints[:]
        config.waypoints.append(WAYPOINT)
    workloads, services = bookinfo()
    result = compile_table(WAYPOINT, workloads, services, configs, allow_http_jwks=True)
    assert result.errors == (), [str(e) for e in result.errors]


# ---- the waypoint accepts per resource ------------------------------------------------------------------

def _update(configs: dict[str, pb.L7Config], updated: list[str]) -> Update:
    return Update(type_url=rs.L7_CONFIG, version="2", nonce="n", updated={n: configs[n] for n in updated},
                  removed=(), resources=configs)


def test_the_waypoint_applies_the_good_resources_and_reports_the_bad_one() -> None:
    tables: list[Any] = []
    config = WaypointConfig(WAYPOINT, tables.append)
    workloads, services = bookinfo()
    config.handle(Update(rs.WORKLOAD, "1", "a", {w.uid: w for w in workloads}, (), {w.uid: w for w in workloads}))
    config.handle(Update(rs.SERVICE, "1", "b", {rs.name_of(s): s for s in services}, (),
                         {rs.name_of(s): s for s in services}))
    deny, bad = l7("AuthorizationPolicy", "deny-delete", DENY_DELETE), l7("RequestAuthentication", "jwt", EMPTY_JWKS)
    configs = {rs.name_of(deny): deny, rs.name_of(bad): bad}
    config.handle(_update(configs, list(configs)))  # before: Rejected, and the DENY was not applied
    assert [p.ref for p in tables[-1].policies] == ["bookinfo/deny-delete"]
    summary = config.summary()
    assert "no usable key" in summary["rejected_resources"]["RequestAuthentication/bookinfo/jwt"]
    # A response of which nothing can be applied is refused (NACK), with the reason.
    worse = l7("RequestAuthentication", "jwt2", {"targetRefs": GATEWAY_TARGET, "jwtRules": [{"issuer": "x"}]})
    with pytest.raises(Rejected, match="jwt2"):
        config.handle(_update({**configs, rs.name_of(worse): worse}, [rs.name_of(worse)]))
    # Deleting the bad one clears its report.
    config.handle(Update(rs.L7_CONFIG, "3", "m", {}, (rs.name_of(bad),), {rs.name_of(deny): deny}))
    assert config.summary()["rejected_resources"] == {}
    assert [p.ref for p in tables[-1].policies] == ["bookinfo/deny-delete"]


# ---- the control plane resends what was NACKed with a bad one ---------------------------------------------

def _snap(version: str, *msgs: Any) -> Snapshot:
    res: dict[str, dict[str, tuple[str, Any]]] = {}
    for m in msgs:
        a = rs.pack(m)
        res.setdefault(a.type_url, {})[rs.name_of(m)] = (rs.version_of(a), a)
    return Snapshot(version=version, resources=res)  # type: ignore[arg-type]


def _req(nonce: str = "", error: str = "") -> xds.DeltaDiscoveryRequest:
    r = xds.DeltaDiscoveryRequest(type_url=rs.WORKLOAD, response_nonce=nonce)
    r.node.CopyFrom(NodeInfo(id="nodeagent~n1~n1.", role="nodeagent", node="n1").to_proto())
    if error:
        r.error_detail.code = 3
        r.error_detail.message = error
    return r


def _workload(name: str, ip: str) -> pb.Workload:
    return pb.Workload(uid=f"default/{name}", name=name, namespace="default", addresses=[ip])


def test_a_nacked_response_is_resent_in_halves_until_the_bad_one_is_alone() -> None:
    s = StreamState(view, nonce_prefix="t")
    a, good, bad = _workload("a", "10.0.0.1"), _workload("good", "10.0.0.2"), _workload("bad", "not-an-ip")
    first = [o for o in s.receive(_req(), _snap("1", a)) if isinstance(o, Push)][0]
    s.receive(_req(first.nonce), _snap("1", a))
    snap = _snap("2", a, good, bad)
    [both] = s.on_snapshot(snap, {rs.WORKLOAD: ["default/good", "default/bad"]})
    assert isinstance(both, Push) and [u[0] for u in both.updated] == ["default/bad", "default/good"]
    out = s.receive(_req(both.nonce, error="default/bad: not an IP"), snap)
    assert isinstance(out[0], Nacked)
    singles = [o for o in out if isinstance(o, Push)]  # before: nothing, and "good" was never sent again
    assert [[u[0] for u in p.updated] for p in singles] == [["default/bad"], ["default/good"]]
    by_name = {p.updated[0][0]: p for p in singles}
    assert s.receive(_req(by_name["default/good"].nonce), snap) == [Acked(rs.WORKLOAD, by_name["default/good"].nonce, "2")]
    nack = s.receive(_req(by_name["default/bad"].nonce, error="default/bad: not an IP"), snap)
    assert [o for o in nack if isinstance(o, Push)] == []  # one resource alone: rejected, not resent
    assert s.status()[rs.WORKLOAD]["nack"]["names"] == ["default/bad"]  # type: ignore[index]
    assert s.on_snapshot(_snap("3", a, good, bad), None) == []
    # The bad one deleted: nothing to send (the client never took it), the NACK is over.
    assert s.on_snapshot(_snap("4", a, good), None) == []
    assert s.status()[rs.WORKLOAD]["resources"] == 2


def test_a_large_nacked_response_is_bisected_without_flooding() -> None:
    s = StreamState(view, nonce_prefix="b")
    good = [_workload(f"w{i:03}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(300)]
    bad = _workload("w150x", "bad")
    snap = _snap("1", *good, bad)
    [push] = [o for o in s.receive(_req(), snap) if isinstance(o, Push)]
    outstanding, pushes = [push], 1
    while outstanding:
        p = outstanding.pop()
        has_bad = any(n == "default/w150x" for n, _, _ in p.updated)
        out = s.receive(_req(p.nonce, error="default/w150x: not an IP" if has_bad else ""), snap)
        more = [o for o in out if isinstance(o, Push)]
        assert len(more) <= 2  # a NACK makes at most two responses
        outstanding += more
        pushes += len(more)
    assert pushes <= 2 * 10 + 1  # about two per halving: log2(301) levels
    assert s.status()[rs.WORKLOAD]["resources"] == 300
    assert s.status()[rs.WORKLOAD]["nack"]["names"] == ["default/w150x"]  # type: ignore[index]


def test_an_all_or_nothing_client_still_gets_the_good_resources(tmp_path: Path) -> None:
    source = MemorySource([_workload("a", "10.0.0.1")])
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
                            source)
    running = cp.start()

    def refuse_bad(update: Update) -> None:
        bad = [n for n, m in update.updated.items() if "bad" in list(m.addresses)]  # type: ignore[attr-defined]
        if bad:
            raise Rejected(f"{bad[0]}: address 'bad' is not an IP")

    token = running.extras["token_issuer"].mint_node_token("n1")
    cfg = ClientConfig(target=f"127.0.0.1:{running.grpc_port}", node=NodeInfo(id="", role="nodeagent", node="n1"),
                       subscriptions={rs.WORKLOAD: None}, root_pem=running.root_pem,
                       metadata=(("authorization", f"Bearer {token}"),))
    try:
        with XdsClient(cfg, refuse_bad) as c:
            assert c.wait_synced(10)
            source.put(_workload("z-bad", "bad"), quiet=True)
            source.put(_workload("good", "10.0.0.2"))  # one push carries both
            assert c.wait_for(lambda c: "default/good" in c.resources(rs.WORKLOAD), 10)
            assert "default/z-bad" not in c.resources(rs.WORKLOAD)
            source.remove(rs.WORKLOAD, "default/z-bad")
            source.put(_workload("later", "10.0.0.3"))
            assert c.wait_for(lambda c: "default/later" in c.resources(rs.WORKLOAD), 10)
    finally:
        cp.stop()
