"""Item 6: who the client is and what the waypoint serves are decided from verified facts.

- `source.ip` / `ipBlocks` come from the HBONE connection's peer address, never from the `Forwarded`
  header the client wrote (`remoteIpBlocks` follows X-Forwarded-For only through trusted hops: none by
  default, as Envoy with `xff_num_trusted_hops: 0`).
- A CONNECT is admitted only for a service or workload that uses this waypoint.
- A policy's `targetRefs` into another namespace are ignored unless the policy is in the root namespace.
- A VirtualService of another namespace never overrides the service's own namespace's VirtualService,
  and one exported only to its own namespace (`exportTo: ["."]`) is not seen by other namespaces'
  waypoints.
"""

from __future__ import annotations

from typing import Any

import trio
from google.protobuf import json_format

from controlplane.config.store import Store
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.loader import parse_text
from mesh.hbone.headers import parse_authority
from mesh.proto import discovery_pb2 as pb
from tests.security.waypoint_helpers import (
    SLEEP,
    admitting_front,
    l7,
    policy,
    request,
    reviews_table,
    run,
    running_proxy,
    start_backend,
)
from tests.unit.waypoint.waypoint_resources import REVIEWS_DR, bookinfo, fq, service
from waypoint.config import compile_table
from waypoint.inbound import Refusal, admit

SPOOFED = "10.9.9.9:4444"


def test_source_ip_is_the_tunnel_peer_not_the_forwarded_header() -> None:
    deny_me = policy("deny-loopback", {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["127.0.0.1/32"]}}]}]})
    deny_remote = policy("deny-remote", {"action": "DENY", "rules": [{"from": [{"source": {"remoteIpBlocks": ["127.0.0.1"]}}]}]})

    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            for deny in (deny_me, deny_remote):
                async with running_proxy(reviews_table(backend.port, deny)) as (proxy, _front, _log, nursery):
                    front = await admitting_front(proxy, "10.96.0.11:9080", SPOOFED, nursery)
                    # The client claims another address in Forwarded and X-Forwarded-For: still denied.
                    head, _ = await request(front.port, "/", headers=(("x-forwarded-for", "10.9.9.9"),))
                    assert (deny.name, head.status) == (deny.name, 403)
            assert backend.seen == []
            n.cancel_scope.cancel()
    run(main)

    table = reviews_table(1)
    client = admit(table, parse_authority("10.96.0.11:9080"), SLEEP, SPOOFED, "10.244.1.7:40000")
    assert not isinstance(client, Refusal) and client.source_ip == "10.244.1.7"
    # The port of Forwarded is kept only when it names the same address (as the node agent does).
    client = admit(table, parse_authority("10.96.0.11:9080"), SLEEP, "10.244.1.7:5555", "10.244.1.7:40000")
    assert not isinstance(client, Refusal) and client.source == "10.244.1.7:5555"


def _mesh() -> tuple[list[pb.Workload], list[pb.Service]]:
    workloads, services = bookinfo()  # bookinfo's services use bookinfo/waypoint
    bank = service("payments", "10.96.5.5", ns="bank")  # another namespace's service, with its own waypoint
    plain = service("legacy", "10.96.6.6", waypoint="")  # a service of bookinfo that uses no waypoint
    return workloads, [*services, bank, plain]


def test_waypoint_refuses_tunnels_to_services_it_does_not_serve() -> None:
    workloads, services = _mesh()
    table = compile_table("bookinfo/waypoint", workloads, services, []).table
    assert not isinstance(admit(table, parse_authority("10.96.0.11:9080"), SLEEP, None, "10.244.1.7:1"), Refusal)
    for authority in ("10.96.5.5:9080", "10.96.6.6:9080"):
        refusal = admit(table, parse_authority(authority), SLEEP, None, "10.244.1.7:1")
        assert isinstance(refusal, Refusal) and 400 <= refusal.status < 500, authority
        assert authority in refusal.reason


def test_cross_namespace_target_refs_are_ignored_at_the_waypoint() -> None:
    workloads, services = _mesh()
    into_bookinfo = [{"kind": "Gateway", "name": "waypoint", "namespace": "bookinfo"}]
    svc_ref = [{"kind": "Service", "name": "reviews", "namespace": "bookinfo"}]
    # What the control plane sent before the fix: the foreign policies addressed to bookinfo's waypoint.
    foreign = [l7("AuthorizationPolicy", "widen", {"targetRefs": into_bookinfo, "action": "DENY", "rules": [{}]}, ns="attacker"),
               l7("AuthorizationPolicy", "widen-svc", {"targetRefs": svc_ref, "action": "DENY", "rules": [{}]},
                  [fq("reviews")], ns="attacker"),
               l7("RequestAuthentication", "jwt", {"targetRefs": into_bookinfo, "jwtRules": [
                   {"issuer": "evil", "jwks": '{"keys": []}'}]}, ns="attacker")]
    root = l7("AuthorizationPolicy", "mesh-wide", {"targetRefs": into_bookinfo, "action": "AUDIT", "rules": [{}]},
              ns="istio-system")
    result = compile_table("bookinfo/waypoint", workloads, services, [*foreign, root])
    assert not result.errors
    assert [p.ref for p in result.table.policies] == ["istio-system/mesh-wide"]
    assert result.table.jwt_rules == ()
    assert any("attacker/widen" in w and "namespace" in w for w in result.warnings)


STORE = """
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: attacker}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}], clusterIP: 10.96.0.11}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: widen, namespace: attacker}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: bookinfo}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: widen-svc, namespace: attacker}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews, namespace: bookinfo}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: bookinfo}]
  action: AUDIT
  rules: [{}]
"""


def test_cross_namespace_target_refs_are_ignored_by_the_control_plane() -> None:
    store = Store()
    store.apply(parse_text(STORE, "store.yaml"))
    t = translate_snapshot(store.snapshot())
    for name in ("widen", "widen-svc"):
        msg = t.l7[f"AuthorizationPolicy/attacker/{name}"]
        assert list(msg.waypoints) == [] and list(msg.hostnames) == [], name
        assert any(f"attacker/{name}" in p and "namespace" in p for p in t.problems), t.problems
    assert list(t.l7["AuthorizationPolicy/istio-system/mesh-wide"].waypoints) == ["bookinfo/waypoint"]


def _vs(name: str, ns: str, subset: str, **extra: Any) -> pb.L7Config:
    spec = {"hosts": [fq("reviews")], "http": [{"route": [{"destination": {"host": fq("reviews"), "subset": subset}}]}],
            **extra}
    return l7("VirtualService", name, spec, [fq("reviews")], ns=ns)


def test_virtual_service_of_another_namespace_does_not_override_the_services_own() -> None:
    workloads, services = _mesh()
    dr = l7("DestinationRule", "reviews", REVIEWS_DR, [fq("reviews")])
    own = _vs("reviews", "bookinfo", "v1")
    foreign = _vs("aaa-hijack", "aaa", "v3")  # sorts before bookinfo
    result = compile_table("bookinfo/waypoint", workloads, services, [dr, own, foreign])
    chosen = result.table.virtual_service(fq("reviews"))
    assert chosen is not None and (chosen.namespace, chosen.name) == ("bookinfo", "reviews")
    # exportTo ".": visible to its own namespace only, so not to bookinfo's waypoint even when bookinfo has none.
    private = _vs("private", "aaa", "v3", exportTo=["."])
    result = compile_table("bookinfo/waypoint", workloads, services, [dr, private])
    assert result.table.virtual_service(fq("reviews")) is None
    exported = _vs("exported", "aaa", "v3", exportTo=["bookinfo"])
    result = compile_table("bookinfo/waypoint", workloads, services, [dr, exported])
    chosen = result.table.virtual_service(fq("reviews"))
    assert chosen is not None and chosen.name == "exported"
    assert json_format.MessageToDict(exported.spec)["exportTo"] == ["bookinfo"]
