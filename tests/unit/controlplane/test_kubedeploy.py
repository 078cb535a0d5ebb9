"""Ingress gateways deployed on Kubernetes (`controlplane.config.kubedeploy`), through the real `kubernetes`
client against the stand-in API server: each Gateway of class istio gets its ServiceAccount, Deployment and
LoadBalancer Service `<gateway>-istio`, owned by the Gateway, by server-side apply; they follow its listeners
and certificates; a Gateway asking for a manual deployment is left alone; a Gateway whose objects cannot be
made gets none.  The Deployment is valid Kubernetes and its command parses with the waypoint's own flags."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_apiserver
import kubernetes_validate
import pytest
from fake_apiserver import FakeApiServer
from kube_objects import namespace

import waypoint.main
from controlplane.config.kubedeploy import (
    CERT_ROOT,
    FIELD_MANAGER,
    MANAGED_LABEL,
    MANAGED_VALUE,
    REVISION_ANNOTATION,
    GatewayDeployError,
    is_managed,
    manifests,
)
from controlplane.config.kubernetes import KubernetesSource, Timing, api_client
from controlplane.config.store import Store
from mesh.api.validate import Document
from tests.tlsfiles import server_cert

pytestmark = pytest.mark.timeout(40)
FAST = Timing(backoff_initial=0.05, backoff_max=0.2, watch_timeout=5, request_timeout=2.0, status_resync=0.1,
              deploy_resync=0.1)
GROUP = "gateway.networking.k8s.io"
NS = "web"
KINDS = ("ServiceAccount", "Deployment", "Service")
K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.30")


def gateway(name: str = "ingress", *, extra_port: int = 0, cert: str = "web-cert", http: bool = True,
            addresses: list[dict[str, str]] | None = None) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = [
        {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "shop.example.com",
         "tls": {"mode": "Terminate", "certificateRefs": [{"name": cert}]}}]
    if http:
        listeners.insert(0, {"name": "http", "port": 80, "protocol": "HTTP"})
    if extra_port:
        listeners.append({"name": "alt", "port": extra_port, "protocol": "HTTP"})
    spec: dict[str, Any] = {"gatewayClassName": "istio", "listeners": listeners}
    if addresses is not None:
        spec["addresses"] = addresses
    return {"apiVersion": f"{GROUP}/v1", "kind": "Gateway", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def secret(name: str = "web-cert") -> dict[str, Any]:
    cert = server_cert("shop.example.com")
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": base64.b64encode(cert.chain).decode(), "tls.key": base64.b64encode(cert.key).decode()}}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    monkeypatch.setitem(fake_apiserver.COLLECTIONS, ("", "v1", "secrets"), ("Secret", True))
    with FakeApiServer() as server:
        server.put(namespace(NS))
        server.put(secret())
        yield server


@pytest.fixture
def source(api: FakeApiServer, tmp_path: Path) -> Iterator[KubernetesSource]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    s = KubernetesSource(api_client(kubeconfig), Store(check_references=False), timing=FAST)
    s.start()
    s.wait_synced(5)
    yield s
    s.stop()


def complete(api: FakeApiServer, gw: str = "ingress") -> bool:
    """All three objects, with the HTTPS listener (the Secret may reach the store after the Gateway)."""
    made = objects(api, gw)
    return len(made) == 3 and 443 in service_ports(made["Service"]) and any(
        flag.startswith("https=") for flag in listener_flags(made["Deployment"]))


def objects(api: FakeApiServer, gw: str = "ingress") -> dict[str, dict[str, Any]]:
    found = {kind: api.get(kind, NS, f"{gw}-istio") for kind in KINDS}
    return {kind: obj for kind, obj in found.items() if obj is not None}


def applies(api: FakeApiServer, gw: str) -> list[fake_apiserver.Recorded]:
    return [r for r in api.requests if r.method == "PATCH" and r.path.endswith(f"/{gw}-istio")]


def args_of(deployment: dict[str, Any]) -> list[str]:
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


def listener_flags(deployment: dict[str, Any]) -> list[str]:
    args = args_of(deployment)
    return [args[i + 1] for i, a in enumerate(args) if a == "--listener"]


def service_ports(service: dict[str, Any]) -> set[int]:
    return {p["port"] for p in service["spec"]["ports"]}


# ---- through the API server --------------------------------------------------------------------------


def test_a_gateway_gets_its_objects_owned_by_it(api: FakeApiServer, source: KubernetesSource) -> None:
    uid = api.put(gateway())["metadata"]["uid"]
    assert api.wait_for(lambda: complete(api)), objects(api)
    made = objects(api)
    for kind, obj in made.items():
        assert obj["metadata"]["labels"][MANAGED_LABEL] == MANAGED_VALUE, kind
        assert obj["metadata"]["ownerReferences"] == [{"apiVersion": f"{GROUP}/v1", "kind": "Gateway",
                                                       "name": "ingress", "uid": uid, "controller": True}], kind
    service, deployment = made["Service"], made["Deployment"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["selector"] == {f"{GROUP}/gateway-name": "ingress"}
    assert service_ports(service) == {80, 443, 15021}
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"][f"{GROUP}/gateway-name"] == "ingress"
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["serviceAccountName"] == "ingress-istio"
    assert listener_flags(deployment) == [
        "http=HTTP:80", f"https=HTTPS:443:{CERT_ROOT}/web-cert/tls.crt:{CERT_ROOT}/web-cert/tls.key"]
    (mount,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == f"{CERT_ROOT}/web-cert"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "web-cert"
    # Server-side apply, as this controller's fields.
    for r in applies(api, "ingress"):
        assert r.headers["content-type"].startswith("application/apply-patch+yaml")
        assert r.query["fieldManager"] == FIELD_MANAGER and r.query["force"] in ("true", "True")


def test_objects_follow_the_listeners_and_the_certificate(api: FakeApiServer, source: KubernetesSource) -> None:
    api.put(gateway())
    assert api.wait_for(lambda: complete(api))
    before = objects(api)
    api.put(gateway(extra_port=8080))
    assert api.wait_for(lambda: service_ports(objects(api)["Service"]) == {80, 443, 8080, 15021})
    assert api.wait_for(lambda: "alt=HTTP:8080" in listener_flags(objects(api)["Deployment"]))
    after = objects(api)
    assert after["Deployment"]["metadata"]["uid"] == before["Deployment"]["metadata"]["uid"]  # updated, not replaced
    assert after["Deployment"]["metadata"]["resourceVersion"] != before["Deployment"]["metadata"]["resourceVersion"]

    def revision() -> str:
        return str(objects(api)["Deployment"]["spec"]["template"]["metadata"]["annotations"][REVISION_ANNOTATION])

    old = revision()
    api.put(secret())  # a new certificate: the pods roll (the process does not reload it)
    assert api.wait_for(lambda: revision() != old)
    # A listener taken away leaves the Service.
    api.put(gateway())
    assert api.wait_for(lambda: service_ports(objects(api)["Service"]) == {80, 443, 15021})


def test_a_manual_deployment_is_not_touched(api: FakeApiServer, source: KubernetesSource) -> None:
    mine = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "manual-istio", "namespace": NS},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "mine"}}}}
    mine_rv = api.put(mine)["metadata"]["resourceVersion"]
    api.put(gateway("manual", addresses=[{"type": "Hostname", "value": "my-gateway.web.svc.cluster.local"}]))
    api.put(gateway("managed"))  # applied in the same pass as, or after, the manual one was looked at
    assert api.wait_for(lambda: complete(api, "managed"))
    assert applies(api, "manual") == []
    assert objects(api, "manual").keys() == {"Deployment"}
    assert objects(api, "manual")["Deployment"]["metadata"]["resourceVersion"] == mine_rv
    # It turns managed when it no longer asks for a manual deployment.
    api.put(gateway("manual", addresses=[{"type": "IPAddress", "value": "203.0.113.7"}]))
    assert api.wait_for(lambda: complete(api, "manual"))


def test_a_gateway_whose_objects_cannot_be_made_gets_none(api: FakeApiServer, source: KubernetesSource) -> None:
    long_name = "g" * 60  # a valid Gateway name, but `<name>-istio` is too long for a Service
    api.put(gateway(long_name))
    api.put(gateway("nocert", cert="missing", http=False))  # its one listener cannot be served
    api.put(gateway("good"))
    assert api.wait_for(lambda: complete(api, "good"))
    source.gateway_deploy.work()  # one more full pass after the good one, to be sure the others were seen
    assert objects(api, long_name) == {} and applies(api, long_name) == []
    assert objects(api, "nocert") == {} and applies(api, "nocert") == []


def refused(api: FakeApiServer, name: str) -> bool:
    return any(e.get("reason") == "InvalidConfiguration" and e["involvedObject"]["name"] == name for e in api.events)


def test_a_refused_gateway_changes_nothing(api: FakeApiServer, source: KubernetesSource) -> None:
    api.put(gateway())
    assert api.wait_for(lambda: complete(api))
    before = objects(api)
    bad = gateway(extra_port=9000)
    bad["spec"]["listeners"][-1]["hostname"] = "Shop.Example.com"  # not lower-case: the validator refuses it
    api.put(bad)
    broken = gateway("broken")
    broken["spec"]["listeners"][0]["protocol"] = "UDP"
    api.put(broken)
    assert api.wait_for(lambda: refused(api, "ingress") and refused(api, "broken"))
    source.gateway_deploy.work()
    assert objects(api) == before  # the accepted version stays deployed, untouched
    assert objects(api, "broken") == {} and applies(api, "broken") == []


def test_a_failed_write_is_retried_and_completes(api: FakeApiServer, source: KubernetesSource) -> None:
    api.fail("PATCH", f"/api/v1/namespaces/{NS}/services/ingress-istio", 500, times=2)
    api.put(gateway())
    assert api.wait_for(lambda: complete(api))
    assert len([r for r in applies(api, "ingress") if "/services/" in r.path]) >= 3


def test_a_deleted_gateway_is_not_deployed_again(api: FakeApiServer, source: KubernetesSource) -> None:
    api.put(gateway())
    assert api.wait_for(lambda: complete(api))
    api.delete("Gateway", NS, "ingress")
    assert api.wait_for(lambda: not source.store.snapshot().of_kind("Gateway"))
    for kind in KINDS:  # what Kubernetes' garbage collector does, by the ownerReferences
        api.delete(kind, NS, "ingress-istio")
    count = len(applies(api, "ingress"))
    source.gateway_deploy.work()
    assert objects(api) == {} and len(applies(api, "ingress")) == count


# ---- the objects themselves -----------------------------------------------------------------------------


def _store_with_secret() -> Store:
    store = Store(check_references=False)
    store.apply([Document("test", 0, secret())])
    return store


def _made(gw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    gw["metadata"]["uid"] = "0b5e6f3c-1d2e-4f50-8a9b-0c1d2e3f4a5b"
    return {o["kind"]: o for o in manifests(gw, _store_with_secret().snapshot())}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_objects_are_valid_kubernetes(version: str) -> None:
    made = _made(gateway(extra_port=8080))
    assert made.keys() == set(KINDS)
    for obj in made.values():
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_command_parses_with_the_waypoints_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = _made(gateway())["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "waypoint.main"]
    # The kubelet's part: the mounted Secret's files, the token and root certificate, $(VAR) expanded.
    files = tmp_path / "secret"
    files.mkdir()
    data = secret()["data"]
    for key in ("tls.crt", "tls.key"):
        (files / key).write_bytes(base64.b64decode(data[key]))
    args = [a.replace(f"{CERT_ROOT}/web-cert", str(files)).replace("$(POD_NAMESPACE)", NS)
            .replace("$(NODE_NAME)", "node-1") for a in args_of(deployment)]
    provided = {"/var/run/secrets/istio/root-cert.pem", "/var/run/secrets/tokens/istio-token"}
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: str(self) in provided or real_is_file(self))
    opts = waypoint.main.parse_args(args)
    assert (opts.name, opts.namespace, opts.service_account) == ("ingress", NS, "ingress-istio")
    assert [(li.name, li.port, li.protocol) for li in opts.listeners] == [("http", 80, "HTTP"), ("https", 443, "HTTPS")]


def test_bad_gateways_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(GatewayDeployError, match=r"Gateway web/g{60}: its Service 'g{60}-istio' .* at most 57"):
        _made(gateway("g" * 60))
    with pytest.raises(GatewayDeployError, match=r"Gateway web/ingress: port 15021 is the gateway pod's own"):
        _made(gateway(extra_port=15021))
    no_uid = gateway()
    with pytest.raises(GatewayDeployError, match="metadata.uid"):
        manifests(no_uid, _store_with_secret().snapshot())
    assert _made(gateway("nocert", cert="missing", http=False)) == {}


@pytest.mark.parametrize(("addresses", "managed"), [
    (None, True), ([], True), ([{"value": "203.0.113.7"}], True), ([{"type": "IPAddress", "value": "203.0.113.7"}], True),
    ([{"type": "Hostname", "value": "gw.web.svc.cluster.local"}], False),
    ([{"type": "IPAddress", "value": "203.0.113.7"}, {"type": "IPAddress", "value": "203.0.113.8"}], False)])
def test_manual_deployment_is_istios_rule(addresses: list[dict[str, str]] | None, managed: bool) -> None:
    assert is_managed(gateway(addresses=addresses)) is managed
