"""The configuration analysis (`controlplane.analysis`): each message fires on the configuration it is
about and stays quiet on the corrected one.  Configuration goes through a real store, as an apply would."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml

from controlplane.analysis import CODES, Level, Message, analyze, with_messages, without_messages
from controlplane.config.source import Snapshot
from controlplane.config.store import Store
from mesh.api.validate import Document, Ref

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {nodeName: node-1, containers: [{name: app, command: [app]}]}
status: {phase: Running, podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: bookinfo, labels: {app: sleep}}
spec: {nodeName: node-1, containers: [{name: app, command: [app]}]}
status: {phase: Running, podIP: 10.244.1.6}
"""

LEGACY_POD = """
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: legacy, labels: {app: sleep}}
spec: {nodeName: node-2, containers: [{name: app, command: [app]}]}
status: {phase: Running, podIP: 10.244.2.6}
"""

WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo, labels: {istio.io/waypoint-for: service}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""

BOUND = BASE.replace("labels: {istio.io/dataplane-mode: ambient}}",
                     "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}", 1) + "---" + WAYPOINT

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: NAME, namespace: bookinfo}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
"""


def snapshot(*texts: str, check_references: bool = True) -> Snapshot:
    clock = itertools.count(1_800_000_000)
    store = Store(check_references=check_references, clock=lambda: float(next(clock)))
    for i, text in enumerate(texts):  # one apply each: later texts are younger objects
        docs = [d for d in yaml.safe_load_all(text) if d]
        store.apply([Document(f"t{i}.yaml", j, d) for j, d in enumerate(docs, start=1)])
    return store.snapshot()


def messages(snap: Snapshot, code: str) -> list[Message]:
    return [m for m in analyze(snap) if m.code.code == code]


def policy(kind: str, name: str, spec: dict[str, Any], ns: str = "bookinfo") -> str:
    return yaml.safe_dump({"apiVersion": "security.istio.io/v1", "kind": kind,
                           "metadata": {"name": name, "namespace": ns}, "spec": spec})


def test_codes_are_numbered_once() -> None:
    assert len({c.code for c in CODES}) == len(CODES) == 9
    assert all(c.code.startswith("AMB01") for c in CODES)


def test_a_clean_mesh_has_nothing_to_say() -> None:
    assert analyze(snapshot(BOUND, VS.replace("NAME", "reviews"))) == []


# ---- AMB0101 ------------------------------------------------------------------------------------------


def test_use_waypoint_naming_a_missing_waypoint() -> None:
    snap = snapshot(BASE.replace("labels: {istio.io/dataplane-mode: ambient}}",
                                 "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: nosuch}}", 1))
    [m] = messages(snap, "AMB0101")
    assert m.code.level is Level.ERROR and m.ref == Ref("Namespace", "", "bookinfo")
    assert str(m).startswith("Error [AMB0101] (Namespace bookinfo) istio.io/use-waypoint=nosuch names waypoint "
                             "bookinfo/nosuch, which does not exist: its traffic skips L7 processing")
    # A service naming one elsewhere, through use-waypoint-namespace.
    svc = BASE.replace("metadata: {name: reviews, namespace: bookinfo}",
                       "metadata: {name: reviews, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint, "
                       "istio.io/use-waypoint-namespace: legacy}}")
    [m] = messages(snapshot(svc), "AMB0101")
    assert m.ref == Ref("Service", "bookinfo", "reviews") and "waypoint legacy/waypoint" in m.text
    assert messages(snapshot(BOUND), "AMB0101") == []
    opted_out = BASE.replace("metadata: {name: reviews, namespace: bookinfo}",
                             "metadata: {name: reviews, namespace: bookinfo, labels: {istio.io/use-waypoint: none}}")
    assert messages(snapshot(opted_out), "AMB0101") == []


# ---- AMB0102 ------------------------------------------------------------------------------------------


def test_route_for_a_service_without_waypoint() -> None:
    [m] = messages(snapshot(BASE, VS.replace("NAME", "reviews")), "AMB0102")
    assert str(m) == ("Warning [AMB0102] (VirtualService reviews.bookinfo) service reviews.bookinfo.svc.cluster.local "
                      "has no waypoint: this VirtualService is not applied to its traffic (bind one: meshctl waypoint "
                      "apply -n bookinfo --enroll-namespace)")
    assert messages(snapshot(BOUND, VS.replace("NAME", "reviews")), "AMB0102") == []
    ingress_only = VS.replace("NAME", "reviews").replace("hosts: [reviews]", "hosts: [reviews]\n  gateways: [gw]")
    assert messages(snapshot(BASE, ingress_only), "AMB0102") == []
    # A host that is no service of the mesh (an external name) is not this analyzer's business.
    assert messages(snapshot(BASE, VS.replace("NAME", "ext").replace("[reviews]", "[api.example.com]")
                             .replace("host: reviews", "host: api.example.com")), "AMB0102") == []


def test_route_kinds_are_read_as_stored() -> None:
    """An HTTPRoute whose parent is a Service: data-driven (`ROUTE_KINDS`), on the stored body."""
    base = snapshot(BASE)
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "reviews", "namespace": "bookinfo"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
                      "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]}}
    state = dict(base.resources)
    state[Ref.of(route)] = route
    [m] = messages(Snapshot(base.version, state), "AMB0102")
    assert m.ref == Ref("HTTPRoute", "bookinfo", "reviews") and "this HTTPRoute is not applied" in m.text
    bound = snapshot(BOUND)
    state = dict(bound.resources)
    state[Ref.of(route)] = route
    assert messages(Snapshot(bound.version, state), "AMB0102") == []
    route["spec"]["parentRefs"] = [{"kind": "Gateway", "name": "ingress"}]  # not a service parent
    state = dict(base.resources)
    state[Ref.of(route)] = route
    assert messages(Snapshot(base.version, state), "AMB0102") == []


# ---- AMB0103 ------------------------------------------------------------------------------------------


def test_subset_without_destination_rule() -> None:
    vs = VS.replace("NAME", "reviews").replace("host: reviews}", "host: reviews, subset: v2}")
    [m] = messages(snapshot(BOUND, vs, check_references=False), "AMB0103")  # as on Kubernetes: not refused
    assert m.code.level is Level.ERROR and m.text == (
        "spec.http[0].route[0].destination.subset: subset 'v2' of host reviews.bookinfo.svc.cluster.local is not "
        "defined by any DestinationRule (defined: none)")
    dr = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec: {host: reviews, subsets: [{name: v2, labels: {version: v2}}]}
"""
    assert messages(snapshot(BOUND, dr, vs), "AMB0103") == []


# ---- AMB0104 ------------------------------------------------------------------------------------------


def test_policies_that_select_nothing() -> None:
    nobody = policy("AuthorizationPolicy", "nobody", {"selector": {"matchLabels": {"app": "ratings"}}})
    [m] = messages(snapshot(BASE, nobody), "AMB0104")
    assert m.text == "selector app=ratings matches no pod in namespace bookinfo: this AuthorizationPolicy applies to nothing"
    somebody = policy("AuthorizationPolicy", "somebody", {"selector": {"matchLabels": {"app": "reviews"}}})
    assert messages(snapshot(BASE, somebody), "AMB0104") == []
    targets = policy("AuthorizationPolicy", "targets", {"targetRefs": [
        {"kind": "Service", "group": "", "name": "ratings"}, {"kind": "Service", "group": "", "name": "reviews"},
        {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "nosuch"}]})
    assert sorted(m.text for m in messages(snapshot(BASE, targets), "AMB0104")) == [
        "targets Gateway bookinfo/nosuch, which does not exist: not enforced",
        "targets Service bookinfo/ratings, which does not exist",
        "targets Service bookinfo/reviews, which has no waypoint: not enforced"]
    to_waypoint = policy("AuthorizationPolicy", "wp", {"targetRefs": [
        {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"},
        {"kind": "Service", "group": "", "name": "reviews"}]})
    assert messages(snapshot(BOUND, to_waypoint), "AMB0104") == []


# ---- AMB0105 ------------------------------------------------------------------------------------------


def test_strict_with_callers_outside_the_mesh() -> None:
    strict = policy("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}})
    [m] = messages(snapshot(BASE, LEGACY_POD, strict), "AMB0105")
    assert m.ref == Ref("PeerAuthentication", "bookinfo", "strict")
    assert "1 workload(s) are outside the mesh (legacy/sleep)" in m.text
    assert "bookinfo/reviews-v1, bookinfo/sleep" in m.text
    assert messages(snapshot(BASE, strict), "AMB0105") == []  # every caller is in the mesh
    permissive = policy("PeerAuthentication", "p", {"mtls": {"mode": "PERMISSIVE"}})
    assert messages(snapshot(BASE, LEGACY_POD, permissive), "AMB0105") == []
    # STRICT on workloads that are themselves outside the mesh protects nothing the mesh enforces.
    legacy_strict = policy("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}}, ns="legacy")
    assert messages(snapshot(BASE, LEGACY_POD, legacy_strict), "AMB0105") == []


# ---- AMB0106, AMB0107, AMB0108 ------------------------------------------------------------------------


JWT = {"jwtRules": [{"issuer": "me", "jwksUri": "https://idp.example.com/jwks.json"}]}


def test_request_authentication_with_a_selector() -> None:
    selected = policy("RequestAuthentication", "jwt", {"selector": {"matchLabels": {"app": "reviews"}}, **JWT})
    [m] = messages(snapshot(BOUND, selected), "AMB0106")
    assert str(m).startswith("Warning [AMB0106] (RequestAuthentication jwt.bookinfo) a selector picks workloads' "
                             "sidecars, and in ambient mode there are none")
    targeted = policy("RequestAuthentication", "jwt", {"targetRefs": [
        {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}], **JWT})
    assert messages(snapshot(BOUND, targeted), "AMB0106") == []


def test_custom_policy_fails_closed() -> None:
    custom = policy("AuthorizationPolicy", "ext", {"action": "CUSTOM", "provider": {"name": "ext-authz"},
                                                   "rules": [{"to": [{"operation": {"ports": ["9080"]}}]}]})
    [m] = messages(snapshot(BASE, custom), "AMB0107")
    assert "enforced as DENY" in m.text
    deny = policy("AuthorizationPolicy", "ext", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9080"]}}]}]})
    assert messages(snapshot(BASE, deny), "AMB0107") == []


def test_http_rules_enforced_at_l4() -> None:
    allow = policy("AuthorizationPolicy", "get-only", {"selector": {"matchLabels": {"app": "reviews"}},
                                                       "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    [m] = messages(snapshot(BASE, allow), "AMB0108")
    assert "those rules are dropped (they allow nothing)" in m.text
    deny = allow.replace("selector:", "action: DENY\n  selector:")
    [m] = messages(snapshot(BASE, deny), "AMB0108")
    assert "their HTTP conditions are dropped (they deny more)" in m.text
    at_waypoint = policy("AuthorizationPolicy", "get-only", {
        "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
        "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    assert messages(snapshot(BOUND, at_waypoint), "AMB0108") == []
    l4 = policy("AuthorizationPolicy", "ports", {"rules": [{"to": [{"operation": {"ports": ["9080"]}}]}]})
    assert messages(snapshot(BASE, l4), "AMB0108") == []


# ---- AMB0109 ------------------------------------------------------------------------------------------


def test_two_virtual_services_for_one_host() -> None:
    snap = snapshot(BOUND, VS.replace("NAME", "first"), VS.replace("NAME", "second"))
    [m] = messages(snap, "AMB0109")
    assert m.ref == Ref("VirtualService", "bookinfo", "second")  # the younger one is ignored
    assert m.text.startswith("host reviews.bookinfo.svc.cluster.local is also routed by VirtualService "
                             "first.bookinfo, which is older and is the one used")
    assert messages(snapshot(BOUND, VS.replace("NAME", "first")), "AMB0109") == []


# ---- status ---------------------------------------------------------------------------------------------


def test_messages_show_in_status_and_are_never_taken_from_a_writer() -> None:
    snap = snapshot(BASE, VS.replace("NAME", "reviews"))
    body = snap.get("VirtualService", "bookinfo", "reviews")
    assert body is not None
    [shown] = with_messages([body], analyze(snap))
    assert shown["status"]["validationMessages"][0]["type"] == {"code": "AMB0102", "name": "RouteWithoutWaypoint"}
    assert shown["status"]["validationMessages"][0]["level"] == "WARNING"
    assert "status" not in body  # the store's body is not changed
    assert without_messages(shown) == {k: v for k, v in shown.items() if k != "status"}
    pod = {"kind": "Pod", "status": {"phase": "Running", "validationMessages": []}}
    assert without_messages(pod) == {"kind": "Pod", "status": {"phase": "Running"}}


@pytest.mark.parametrize("bad", [None, "text", {"status": "x"}])
def test_without_messages_leaves_other_shapes_alone(bad: Any) -> None:
    assert without_messages(bad) == bad


def test_a_body_that_cannot_be_read_is_skipped_not_fatal() -> None:
    """A saved resource that no longer validates is kept as saved (`store._loaded`): the analysis of the
    others goes on (as translation's does), and reads of the store keep working."""
    base = snapshot(BASE, VS.replace("NAME", "reviews"))
    state = dict(base.resources)
    for i, bad in enumerate(({"spec": "not a mapping"}, {"spec": {"hosts": 7}}, {"spec": {"selector": []}})):
        for kind in ("VirtualService", "AuthorizationPolicy"):
            body = {"apiVersion": "v1", "kind": kind, "metadata": {"name": f"bad{i}", "namespace": "bookinfo"}, **bad}
            state[Ref.of(body)] = body
    found = analyze(Snapshot(base.version, state))
    assert [(m.code.code, m.ref.name) for m in found] == [("AMB0102", "reviews")]
