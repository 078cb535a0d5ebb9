"""ServiceEntry translation (pure): hosts to services, endpoints to workloads, allocated addresses, and
what is refused or reported."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controlplane.config.store import Store
from controlplane.translate.serviceentries import (
    AUTO_ALLOCATE_NETWORK,
    allocate,
    build_service_entries,
    entry_uid,
)
from controlplane.translate.snapshot import Translation, translate_snapshot
from controlplane.translate.workloads import build_index
from mesh.api.loader import parse_text
from mesh.api.validate import validate_documents
from mesh.proto import discovery_pb2 as pb

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: apps}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: apps, labels: {app: db}}
spec: {nodeName: node-1, serviceAccountName: db, containers: [{name: c}]}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Service
metadata: {name: taken, namespace: apps}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
"""


def translated(text: str) -> Translation:
    store = Store()
    store.apply(parse_text(BASE + "---\n" + text, "test.yaml"))
    return translate_snapshot(store.snapshot())


def test_static_entry_is_a_service_with_plaintext_endpoints() -> None:
    t = translated("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: apps}
spec:
  hosts: [pay.example.com]
  addresses: [203.0.113.10/32]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}, {number: 80, name: http, protocol: HTTP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 198.51.100.1, labels: {zone: a}, ports: {http: 8080}}]
  exportTo: [".", other]
""")
    svc = t.services["apps/pay.example.com"]
    assert (svc.hostname, list(svc.vips), svc.resolution, svc.mesh_external, svc.source_kind, svc.source_name) == (
        "pay.example.com", ["203.0.113.10"], pb.RESOLUTION_STATIC, True, "ServiceEntry", "payments")
    assert list(svc.export_to) == ["apps", "other"]
    assert [(p.service_port, p.target_port, p.app_protocol) for p in svc.ports] == [(443, 8443, "tls"), (80, 0, "http")]
    uid = entry_uid("apps", "payments", "198.51.100.1")
    assert [e.workload_uid for e in svc.endpoints] == [uid]
    w = t.workloads[uid]
    assert (list(w.addresses), w.tunnel_protocol, w.node, w.labels["zone"]) == (["198.51.100.1"], pb.NONE, "", "a")
    assert {(p.service_port, p.target_port) for p in w.services["apps/pay.example.com"].ports} == {(443, 8443), (80, 8080)}


def test_dns_entry_endpoints_are_names_and_hosts_get_stable_addresses() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: apps}
spec:
  hosts: [api.example.com, www.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mirrors, namespace: apps}
spec:
  hosts: [mirror.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints: [{address: eu.mirror.example.net}, {address: 192.0.2.4}]
"""
    t = translated(text)
    api, www = t.services["apps/api.example.com"], t.services["apps/www.example.com"]
    for svc in (api, www):
        assert len(svc.vips) == 1 and ipaddress.ip_address(svc.vips[0]) in AUTO_ALLOCATE_NETWORK
    assert api.vips != www.vips
    assert translated(text).services["apps/api.example.com"].vips == api.vips  # stable: a restart translates anew
    (ep,) = api.endpoints
    assert (t.workloads[ep.workload_uid].hostname, list(t.workloads[ep.workload_uid].addresses)) == ("api.example.com", [])
    mirror = t.services["apps/mirror.example.com"]
    names = [(t.workloads[e.workload_uid].hostname, list(t.workloads[e.workload_uid].addresses)) for e in mirror.endpoints]
    assert names == [("eu.mirror.example.net", []), ("", ["192.0.2.4"])]


def test_none_resolution_and_wildcards_get_no_address_and_no_endpoints() -> None:
    t = translated("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: anything, namespace: apps}
spec:
  hosts: ["*.example.org", plain.example.org]
  ports: [{number: 443, name: tls}]
  resolution: NONE
""")
    for key in ("apps/*.example.org", "apps/plain.example.org"):
        assert (list(t.services[key].vips), list(t.services[key].endpoints)) == ([], [])
        assert t.services[key].resolution == pb.RESOLUTION_NONE


def test_workload_selector_makes_pods_endpoints() -> None:
    t = translated("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: apps}
spec:
  hosts: [db.internal]
  addresses: [10.250.0.1]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP, targetPort: 15432}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
""")
    svc = t.services["apps/db.internal"]
    assert [e.workload_uid for e in svc.endpoints] == ["apps/db-1"]
    assert list(svc.subject_alt_names) == ["spiffe://cluster.local/ns/apps/sa/db"]
    pod = t.workloads["apps/db-1"]
    assert [(p.service_port, p.target_port) for p in pod.services["apps/db.internal"].ports] == [(5432, 15432)]
    assert not svc.mesh_external


def test_static_endpoint_at_a_pod_address_is_that_pod() -> None:
    t = translated("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: apps}
spec:
  hosts: [db.example]
  addresses: [10.250.0.2]
  ports: [{number: 5432, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 10.244.1.7}]
""")
    assert [e.workload_uid for e in t.services["apps/db.example"].endpoints] == ["apps/db-1"]
    assert "apps/db.example" in t.workloads["apps/db-1"].services
    assert not any(w.workload_type == "serviceentry" for w in t.workloads.values())


def test_a_host_that_is_already_a_service_is_left_out_and_reported() -> None:
    t = translated("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: apps}
spec:
  hosts: [taken.apps.svc.cluster.local, fine.example]
  ports: [{number: 80, name: http}]
  resolution: DNS
""")
    assert t.services["apps/taken.apps.svc.cluster.local"].source_kind == ""  # still the Kubernetes Service
    assert "apps/fine.example" in t.services
    assert any("taken.apps.svc.cluster.local is already a service" in p for p in t.problems)


def test_address_ranges_are_reported_not_routed() -> None:
    t = translated("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: range, namespace: apps}
spec:
  hosts: [range.example]
  addresses: [192.168.50.0/24]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 192.168.50.10}]
""")
    assert list(t.services["apps/range.example"].vips) == []
    assert any("address range 192.168.50.0/24" in p for p in t.problems)


class _Snapshot:
    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b.get("kind") == kind]


def test_an_entry_that_cannot_be_translated_is_left_out_and_the_others_served() -> None:
    # Documents that skipped validation (an older version's store): each is left out on its own.
    good = {"kind": "ServiceEntry", "metadata": {"name": "good", "namespace": "apps"},
            "spec": {"hosts": ["good.example"], "resolution": "DNS", "ports": [{"number": 80, "name": "http"}]}}
    bad_static = {"kind": "ServiceEntry", "metadata": {"name": "bad", "namespace": "apps"},
                  "spec": {"hosts": ["bad.example"], "resolution": "STATIC", "endpoints": [{"address": "db.example"}]}}
    no_hosts = {"kind": "ServiceEntry", "metadata": {"name": "nohosts", "namespace": "apps"}, "spec": {}}
    no_name = {"kind": "ServiceEntry", "metadata": {"namespace": "apps"}, "spec": {"hosts": ["x.example"]}}
    listed_spec = {"kind": "ServiceEntry", "metadata": {"name": "listed", "namespace": "apps"}, "spec": ["hosts"]}
    host_number = {"kind": "ServiceEntry", "metadata": {"name": "number", "namespace": "apps"},
                   "spec": {"hosts": [7], "resolution": "DNS"}}
    snapshot = _Snapshot([good, bad_static, no_hosts, no_name, listed_spec, host_number])
    index = build_index(snapshot)
    out = build_service_entries(snapshot, index)
    assert list(out.services) == ["apps/good.example"]
    assert any("ServiceEntry apps/bad: cannot be translated" in e and "not an IP address" in e for e in index.errors)
    assert any("ServiceEntry apps/nohosts: cannot be translated" in e for e in index.errors)
    assert any("metadata.name" in e for e in index.errors)
    assert any("ServiceEntry apps/listed: cannot be translated" in e for e in index.errors)
    assert any("ServiceEntry apps/number: cannot be translated" in e for e in index.errors)


def test_allocation_is_unique_stable_and_inside_the_range() -> None:
    keys = [f"ns{i % 7}/host-{i}.example" for i in range(3000)]
    first = allocate(keys)
    assert len(set(first.values())) == len(keys)
    assert all(ipaddress.ip_address(a) in AUTO_ALLOCATE_NETWORK for a in first.values())
    assert not {"240.240.0.0", "240.240.255.255"} & set(first.values())
    assert allocate(list(reversed(keys))) == first
    # one more entry moves nobody whose slot it does not take
    more = allocate([*keys, "ns0/new.example"])
    moved = {k for k in keys if more[k] != first[k]}
    assert len(moved) <= 1


BAD = [
    ("static-endpoint-name", "resolution: STATIC\n  endpoints: [{address: db.example}]",
     "spec.endpoints[0].address", "must be an IP address"),
    ("dns-wildcard-no-endpoints", "resolution: DNS\n  hosts: ['*.example.com']",
     "spec.hosts", "wildcard"),
    ("static-no-endpoints", "resolution: STATIC", "spec.endpoints", "required when resolution is STATIC"),
    # found by the translation fuzzer: an endpoint with only ports made translation raise
    ("endpoint-without-address", "resolution: STATIC\n  endpoints: [{ports: {http: 8080}}]",
     "spec.endpoints[0].address", "is required"),
]


@pytest.mark.parametrize(("spec", "path", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_entries_are_refused_with_their_path(spec: str, path: str, fragment: str) -> None:
    hosts = "" if "hosts:" in spec else "  hosts: [a.example.com]\n"
    text = ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: apps}\n"
            f"spec:\n{hosts}  ports: [{{number: 80, name: http}}]\n  {spec}\n")
    _, errors = validate_documents(parse_text(text, "bad.yaml"))
    lines = [str(e) for e in errors]
    assert any(f":{path}: " in line and fragment in line for line in lines), lines
