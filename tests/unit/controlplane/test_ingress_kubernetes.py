"""Ingress Gateways (class istio) on Kubernetes, through the real `kubernetes` client against the stand-in
API server: the Kubernetes source takes the Gateway, watches the Secrets it names (and only those, one by
one, by name), and writes the Gateway's status: Accepted, Programmed from its LoadBalancer Service's
address, addresses, and each listener's conditions and attached routes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_apiserver
import pytest
from fake_apiserver import FakeApiServer
from kube_objects import namespace, service

from controlplane.config.kubegateways import load_balancer_addresses, on_kubernetes, with_times
from controlplane.config.kubeobjects import referenced_secrets
from controlplane.config.kubernetes import KubernetesSource, Timing, api_client
from controlplane.config.store import Store
from mesh.api.validate import Ref
from tests.tlsfiles import server_cert

pytestmark = pytest.mark.timeout(40)
FAST = Timing(backoff_initial=0.05, backoff_max=0.2, watch_timeout=5, request_timeout=2.0, status_resync=0.1)
GROUP = "gateway.networking.k8s.io"
NS = "web"
LB_IP = "203.0.113.10"


def gateway(cert: str = "web-cert", name: str = "ingress", ns: str = NS) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Gateway", "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": "istio", "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "shop.example.com",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": cert}]}}]}}


def secret(name: str, ns: str = NS) -> dict[str, Any]:
    cert = server_cert("shop.example.com")
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(cert.chain).decode(), "tls.key": base64.b64encode(cert.key).decode()}}


def lb_service(ip: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ingress-istio", "namespace": NS},
                            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.80",
                                     "selector": {"gateway.networking.k8s.io/gateway-name": "ingress"},
                                     "ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}}
    if ip:
        body["status"] = {"loadBalancer": {"ingress": [{"ip": ip}]}}
    return body


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    monkeypatch.setitem(fake_apiserver.COLLECTIONS, ("", "v1", "secrets"), ("Secret", True))
    monkeypatch.setitem(fake_apiserver.COLLECTIONS, (GROUP, "v1", "httproutes"), ("HTTPRoute", True))
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def source(api: FakeApiServer, tmp_path: Path) -> Iterator[KubernetesSource]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    api.put(namespace(NS))
    api.put(secret("web-cert"))
    api.put(secret("other-cert"))
    api.put(secret("web-cert", ns="elsewhere"))
    api.put(lb_service())
    api.put(gateway())
    s = KubernetesSource(api_client(kubeconfig), Store(check_references=False), timing=FAST)
    s.start()
    s.wait_synced(5)
    yield s
    s.stop()


def secrets_in_store(s: KubernetesSource) -> set[tuple[str, str]]:
    return {(r.namespace, r.name) for r in s.store.snapshot() if r.kind == "Secret"}


def status(api: FakeApiServer) -> dict[str, Any]:
    return dict((api.get("Gateway", NS, "ingress") or {}).get("status") or {})


def conditions(entry: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in entry.get("conditions") or []}


def listener(api: FakeApiServer, name: str) -> dict[str, Any]:
    return next((li for li in status(api).get("listeners") or [] if li["name"] == name), {})


def test_only_the_named_secret_is_read_and_only_by_name(api: FakeApiServer, source: KubernetesSource) -> None:
    assert api.wait_for(lambda: secrets_in_store(source) == {(NS, "web-cert")})
    assert source.gateway_secrets.watched() == {(NS, "web-cert")}
    assert api.wait_for(lambda: bool(api.watch_requests("secrets")))  # listed, then watched: both by name
    reads = [r for r in api.requests if "/secrets" in r.path]
    assert all(r.path == f"/api/v1/namespaces/{NS}/secrets"
               and r.query.get("fieldSelector") == "metadata.name=web-cert" for r in reads), reads
    assert any(r.query.get("watch") is None for r in reads)
    # The Gateway names another Secret: that one is watched, the first leaves the store.
    api.put(gateway(cert="other-cert"))
    assert api.wait_for(lambda: secrets_in_store(source) == {(NS, "other-cert")})
    assert source.gateway_secrets.watched() == {(NS, "other-cert")}
    # The Gateway goes: no Secret is watched or kept.
    api.delete("Gateway", NS, "ingress")
    assert api.wait_for(lambda: secrets_in_store(source) == set() and not source.gateway_secrets.watched())


def test_a_named_secret_that_comes_and_goes_is_followed(api: FakeApiServer, source: KubernetesSource) -> None:
    assert api.wait_for(lambda: conditions(listener(api, "https")).get("ResolvedRefs") == ("True", "ResolvedRefs"))
    api.delete("Secret", NS, "web-cert")
    assert api.wait_for(lambda: conditions(listener(api, "https")).get("ResolvedRefs")
                        == ("False", "InvalidCertificateRef"))
    assert secrets_in_store(source) == set()
    api.put(secret("web-cert"))
    assert api.wait_for(lambda: conditions(listener(api, "https")).get("ResolvedRefs") == ("True", "ResolvedRefs"))


def test_gateway_status_is_programmed_once_its_service_has_an_address(api: FakeApiServer,
                                                                     source: KubernetesSource) -> None:
    assert api.wait_for(lambda: conditions(status(api)).get("Accepted") == ("True", "Accepted"))
    st = status(api)
    assert conditions(st)["Programmed"] == ("False", "AddressNotAssigned") and st["addresses"] == []
    assert [li["name"] for li in st["listeners"]] == ["http", "https"]
    assert all(c["lastTransitionTime"] for c in st["conditions"])
    accepted_at = next(c["lastTransitionTime"] for c in st["conditions"] if c["type"] == "Accepted")
    api.put(lb_service(LB_IP))  # the cloud's load balancer answers
    assert api.wait_for(lambda: conditions(status(api)).get("Programmed") == ("True", "Programmed"))
    st = status(api)
    assert st["addresses"] == [{"type": "IPAddress", "value": LB_IP}]
    assert conditions(listener(api, "http"))["Programmed"] == ("True", "Programmed")
    assert listener(api, "http")["supportedKinds"] == [{"group": GROUP, "kind": "HTTPRoute"},
                                                       {"group": GROUP, "kind": "GRPCRoute"}]
    assert next(c["lastTransitionTime"] for c in st["conditions"] if c["type"] == "Accepted") == accepted_at
    # Nothing changes: nothing more is written.
    patches = [r for r in api.requests if r.method == "PATCH" and r.path.endswith("/ingress/status")]
    assert not api.wait_for(lambda: len([r for r in api.requests if r.method == "PATCH"
                                         and r.path.endswith("/ingress/status")]) > len(patches), timeout=0.5)


def test_routes_attached_to_the_ingress_gateway_are_counted(api: FakeApiServer, source: KubernetesSource) -> None:
    assert api.wait_for(lambda: listener(api, "http").get("attachedRoutes") == 0)
    api.put(service("shop", NS, vip="10.96.0.20", port=8080))
    api.put({"apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute", "metadata": {"name": "shop", "namespace": NS},
             "spec": {"parentRefs": [{"name": "ingress", "sectionName": "http"}], "hostnames": ["shop.example.com"],
                      "rules": [{"backendRefs": [{"name": "shop", "port": 8080}]}]}})
    assert api.wait_for(lambda: listener(api, "http").get("attachedRoutes") == 1)
    assert listener(api, "https")["attachedRoutes"] == 0  # sectionName: the http listener only
    route = api.get("HTTPRoute", NS, "shop") or {}
    assert api.wait_for(lambda: bool(((api.get("HTTPRoute", NS, "shop") or {}).get("status") or {}).get("parents")))
    parents = (api.get("HTTPRoute", NS, "shop") or route)["status"]["parents"]
    assert conditions(parents[0])["Accepted"] == ("True", "Accepted")


# ---- the pure parts ----------------------------------------------------------------------------------------


def test_referenced_secrets_are_the_gateways_own_namespace_ones() -> None:
    other_ns = {**gateway(), "spec": {**gateway()["spec"], "listeners": [
        {"name": "https", "port": 443, "protocol": "HTTPS",
         "tls": {"certificateRefs": [{"name": "a"}, {"name": "b", "namespace": "elsewhere"},
                                     {"name": "c", "kind": "ConfigMap"}, {"name": "d", "group": "core"}]}}]}}
    waypoint = {**gateway(name="waypoint"), "spec": {**gateway()["spec"], "gatewayClassName": "istio-waypoint"}}
    assert referenced_secrets([other_ns, waypoint]) == {(NS, "a"), (NS, "d")}


def test_addresses_and_programmed_from_the_service() -> None:
    assert load_balancer_addresses({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"},
                                                                            {"hostname": "lb.example.com"}]}}}) == [
        {"type": "IPAddress", "value": "192.0.2.1"}, {"type": "Hostname", "value": "lb.example.com"}]
    ours = {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""},
                           {"type": "Programmed", "status": "False", "reason": "Invalid", "message": "no listener"}],
            "addresses": [], "listeners": [{"name": "https", "publishedAddress": "127.0.0.1:1", "conditions": [
                {"type": "Programmed", "status": "False", "reason": "Invalid", "message": "bad cert"}]}]}
    out = on_kubernetes(ours, Ref("Gateway", NS, "ingress"), lb_service(LB_IP))
    assert conditions(out)["Programmed"] == ("False", "Invalid")  # an address does not make it servable
    assert "publishedAddress" not in out["listeners"][0] and out["addresses"][0]["value"] == LB_IP
    missing = on_kubernetes({**ours, "conditions": [{**ours["conditions"][1], "reason": "Pending"}]},
                            Ref("Gateway", NS, "ingress"), None)
    assert conditions(missing)["Programmed"] == ("False", "AddressNotAssigned")
    assert "no Service web/ingress-istio (type LoadBalancer)" in missing["conditions"][0]["message"]
    timed = with_times(out, None, "T1")
    again = with_times(out, timed, "T2")
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"T1"}
