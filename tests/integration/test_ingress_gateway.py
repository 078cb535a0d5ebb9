"""An ingress Gateway (`gatewayClassName: istio`) in front of the mesh, reached from the host as a user of a
kind cluster reaches it: curl on the host's loopback, at the port the Gateway's status publishes.

One small cluster for the module: two ambient apps (`web`, `api`) that answer with who they are, the path
and the Host they got, an AuthorizationPolicy that admits only the gateway's identity
(`cluster.local/ns/shop/sa/ingress-istio`), and a Gateway with an HTTP listener for `*.example.com` and an
HTTPS listener for `shop.example.com` with a certificate from a Secret signed by the test's own CA.  The
gateway drains for `DRAIN_SECONDS` (its `spec.infrastructure.annotations`, as a waypoint's), so that a
rotation of that Secret, which rolls the gateway's pod under a steady stream of requests, ends soon.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from controlplane.translate.ingressstatus import PUBLISHED_ANNOTATION
from localcluster.waypoints import DRAIN_ANNOTATION, GATEWAY_NAME_LABEL
from tests.integration.conftest import Meshctl, two_node_cluster
from tests.integration.test_mesh import Mesh, eventually
from tests.tlsfiles import ServerCert, server_cert

CLUSTER = "t-ingress"
NS = "shop"
GATEWAY_PRINCIPAL = f"cluster.local/ns/{NS}/sa/ingress-istio"
DRAIN_SECONDS = "1"

APP = '''
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = {"app": os.environ["APP"], "path": self.path, "host": self.headers.get("host", "")}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("0.0.0.0", 8080), Handler)
server.daemon_threads = True
server.serve_forever()
'''


def cluster_yaml(app: Path) -> str:
    apps = "".join(f"""
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NS}
  labels: {{app: {name}}}
spec:
  nodeName: {node}
  containers:
  - name: {name}
    command: [{sys.executable}, {app}]
    env: [{{name: APP, value: {name}}}]
    ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080}}]
""" for name, node in (("web", "node-1"), ("api", "node-2")))
    return f"""{two_node_cluster(CLUSTER)}
apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{istio.io/dataplane-mode: ambient}}
""" + apps


def policy(principal: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "only-ingress", "namespace": NS},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [principal]}}]}]}}


def gateway_docs(cert: ServerCert) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-cert", "namespace": NS},
         "type": "kubernetes.io/tls",
         "data": {"tls.crt": base64.b64encode(cert.chain).decode(), "tls.key": base64.b64encode(cert.key).decode()}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "ingress", "namespace": NS},
         "spec": {"gatewayClassName": "istio", "infrastructure": {"annotations": {DRAIN_ANNOTATION: DRAIN_SECONDS}},
                  "listeners": [
             {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
             {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "shop.example.com",
              "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "shop-cert"}]}}]}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "shop", "namespace": NS},
         "spec": {"parentRefs": [{"name": "ingress"}], "hostnames": ["shop.example.com"], "rules": [
             {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
              "backendRefs": [{"name": "api", "port": 8080}]},
             {"backendRefs": [{"name": "web", "port": 8080}]}]}},
    ]


class Ingress(Mesh):
    files: Path = Path()
    cert: ServerCert | None = None

    def apply_docs(self, docs: list[dict[str, Any]]) -> None:
        self.apply(yaml.safe_dump_all(docs), self.files)

    def gateway(self) -> dict[str, Any]:
        out: dict[str, Any] = yaml.safe_load(self.ctl("get", "gateway", "ingress", "-n", NS, "-o", "yaml").stdout)
        return out

    def published(self) -> dict[str, str]:
        """listener -> host:port, from the Gateway's status (once it is Programmed)"""
        status = self.gateway().get("status") or {}
        programmed = any(c["type"] == "Programmed" and c["status"] == "True" for c in status.get("conditions") or [])
        return {li["name"]: li["publishedAddress"] for li in status.get("listeners") or []
                if programmed and li.get("publishedAddress")}

    def gateway_pods(self) -> list[dict[str, Any]]:
        """The gateway's pods in the cluster record."""
        return [p for p in self.status()["plan"]["pods"]
                if p.get("waypoint") and (p.get("labels") or {}).get(GATEWAY_NAME_LABEL) == "ingress"]

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess[str]:  # type: ignore[override]
        """curl on the host, outside the cluster: `-w` gives the status after the body."""
        return subprocess.run(["curl", "-sS", "-m", "10", "-w", "\n%{http_code}", *extra, url],
                              capture_output=True, text=True)


def answer(out: subprocess.CompletedProcess[str]) -> tuple[int, dict[str, Any]]:
    body, _, code = out.stdout.rpartition("\n")
    status = int(code or 0)
    return status, (yaml.safe_load(body) if status == 200 else {})


@pytest.fixture(scope="module")
def ingress(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
            pod_files: Callable[[str], Path]) -> Iterator[Ingress]:
    files = pod_files("ingress")
    (files / "app.py").write_text(APP)
    path = tmp_path_factory.mktemp("ingress") / f"{CLUSTER}.yaml"
    path.write_text(cluster_yaml(files / "app.py"))
    m = Ingress(CLUSTER, meshctl)
    m.files = files
    m.cert = server_cert("shop.example.com")
    (files / "ca.pem").write_bytes(m.cert.ca)
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.apply_docs([policy(GATEWAY_PRINCIPAL), *gateway_docs(m.cert)])
        eventually(lambda: len(m.published()) == 2, timeout=90, interval=0.5)

        def routed() -> bool:
            """the gateway routes shop.example.com to web"""
            return answer(m.curl(f"http://{m.published()['http']}/", "-H", "Host: shop.example.com"))[0] == 200

        eventually(routed, timeout=60, interval=0.5)
        yield m
    finally:
        meshctl("cluster", "down", CLUSTER, check=False)


def test_host_and_path_routes_reach_mesh_services_from_the_host(ingress: Ingress) -> None:
    address = ingress.published()["http"]
    assert address.startswith("127.0.0.1:")
    status, body = answer(ingress.curl(f"http://{address}/api/items?x=1", "-H", "Host: shop.example.com"))
    assert (status, body["app"], body["path"]) == (200, "api", "/api/items?x=1")
    assert body["host"] == "shop.example.com"
    status, body = answer(ingress.curl(f"http://{address}/index.html", "-H", "Host: shop.example.com"))
    assert (status, body["app"]) == (200, "web")
    # a hostname no listener takes, and one a listener takes but no route serves: 404
    assert answer(ingress.curl(f"http://{address}/", "-H", "Host: shop.example.org"))[0] == 404
    assert answer(ingress.curl(f"http://{address}/", "-H", "Host: other.example.com"))[0] == 404


def test_https_listener_terminates_with_the_secrets_certificate(ingress: Ingress) -> None:
    host, port = ingress.published()["https"].rsplit(":", 1)
    out = ingress.curl(f"https://shop.example.com:{port}/api/secure", "--cacert", str(ingress.files / "ca.pem"),
                       "--resolve", f"shop.example.com:{port}:{host}")
    status, body = answer(out)
    assert (status, body.get("app"), body.get("path")) == (200, "api", "/api/secure"), out.stderr
    # without the test's CA the certificate is not trusted: it really is the Secret's, not some default
    refused = ingress.curl(f"https://shop.example.com:{port}/", "--resolve", f"shop.example.com:{port}:{host}")
    assert refused.returncode != 0 and "certificate" in refused.stderr.lower(), refused


def test_the_app_sees_the_gateways_identity(ingress: Ingress) -> None:
    """Only the gateway's principal is admitted: with the policy naming another, the same request fails."""
    address = ingress.published()["http"]
    ingress.apply_docs([policy(f"cluster.local/ns/{NS}/sa/someone-else")])
    try:
        def refused() -> bool:
            """the destination's node agent refuses the gateway"""
            return answer(ingress.curl(f"http://{address}/api/x", "-H", "Host: shop.example.com"))[0] in (502, 503)

        eventually(refused, timeout=20, interval=0.5)
    finally:
        ingress.apply_docs([policy(GATEWAY_PRINCIPAL)])
    eventually(lambda: answer(ingress.curl(f"http://{address}/api/x", "-H", "Host: shop.example.com"))[0] == 200,
               timeout=20, interval=0.5)


def test_gateway_status_and_meshctl_columns(ingress: Ingress) -> None:
    gw = ingress.gateway()
    status = gw["status"]
    assert status["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Accepted": "True", "Programmed": "True"}
    listeners = {li["name"]: li for li in status["listeners"]}
    assert listeners["http"]["attachedRoutes"] == 1 and listeners["https"]["attachedRoutes"] == 1
    table = ingress.ctl("get", "gateway", "-n", NS).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "LISTENERS"]
    row = table[1].split()
    assert row[:4] == ["ingress", "istio", "127.0.0.1", "True"]
    assert f"http={listeners['http']['publishedAddress']}" in row[4]
    pod = yaml.safe_load(ingress.ctl("get", "pod", "ingress", "-n", NS, "-o", "yaml").stdout)
    assert pod["spec"]["serviceAccountName"] == "ingress-istio"


class Load:
    """HTTPS requests to the gateway's published port from the host, each on a new connection, about
    `rate` a second, until stopped: each answer's status (0: the request failed) and the certificate
    that was served, which must be one of `leaves` (DER).  The certificates are compared, not verified:
    the test's CAs all have one name, which a client trusting two of them cannot tell apart."""

    def __init__(self, port: int, leaves: list[bytes], rate: float = 20) -> None:
        self.port, self.interval, self.leaves = port, 1 / rate, leaves
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.results: list[tuple[int, bytes, str]] = []  # (status, leaf DER, error)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _one(self) -> tuple[int, bytes, str]:
        tls = self.context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=10),
                                       server_hostname="shop.example.com")
        leaf = tls.getpeercert(binary_form=True) or b""
        if leaf not in self.leaves:
            tls.close()
            return 0, leaf, "the gateway served a certificate that is not the Secret's"
        conn = http.client.HTTPSConnection("shop.example.com", self.port, timeout=10, context=self.context)
        conn.sock = tls
        try:
            conn.request("GET", "/api/rotation")
            response = conn.getresponse()
            response.read()
            return response.status, leaf, ""
        finally:
            conn.close()
            tls.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.results.append(self._one())
            except Exception as exc:  # noqa: BLE001 - every failure is a failed request
                self.results.append((0, b"", repr(exc)))
            self.stop.wait(self.interval)

    def served(self, leaf: bytes) -> int:
        """Requests answered 200 with certificate `leaf` (DER)."""
        return sum(1 for status, der, _ in self.results if status == 200 and der == leaf)

    def finish(self) -> list[tuple[int, bytes, str]]:
        self.stop.set()
        self.thread.join(timeout=30)
        return self.results


def der(chain: bytes) -> bytes:
    return x509.load_pem_x509_certificate(chain).public_bytes(Encoding.DER)


def test_a_rotated_certificate_rolls_the_gateway_on_the_same_port_without_failing_a_request(ingress: Ingress) -> None:
    """A new Secret is a new revision of the gateway: its new pod starts beside the old one, and once it is
    Ready the host port forwarder sends new connections to it (its ports kept) and the old pod drains.
    Stopping the old pod before starting the new one (as this cluster used to) fails requests and
    publishes new ports."""
    assert ingress.cert is not None
    before = ingress.published()
    [old] = ingress.gateway_pods()
    old_leaf, new_cert = der(ingress.cert.chain), server_cert("shop.example.com")
    load = Load(int(before["https"].rsplit(":", 1)[1]), [old_leaf, der(new_cert.chain)])
    seen = []  # the published addresses, as the Gateway's status says while the roll goes on
    try:
        eventually(lambda: load.served(old_leaf) >= 20, timeout=30, interval=0.2)
        ingress.apply_docs([d for d in gateway_docs(new_cert) if d["kind"] == "Secret"])

        def rolled() -> bool:
            """the new certificate is served, and only the new pod is left"""
            seen.append(ingress.published())
            pods = ingress.gateway_pods()
            return load.served(der(new_cert.chain)) > 0 and len(pods) == 1 and pods[0]["name"] != old["name"]

        eventually(rolled, timeout=90, interval=0.5)
        served = load.served(der(new_cert.chain))
        eventually(lambda: load.served(der(new_cert.chain)) >= served + 20, timeout=30, interval=0.2)
    finally:
        results = load.finish()
        ingress.cert = new_cert
        (ingress.files / "ca.pem").write_bytes(new_cert.ca)
    failed = [(status, error) for status, _, error in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    assert len(results) >= 40
    # once the new certificate is served, the old one never is again
    leaves = [leaf for _, leaf, _ in results]
    first_new = leaves.index(der(new_cert.chain))
    assert set(leaves[first_new:]) == {der(new_cert.chain)}
    assert ingress.published() == before and all(s == before for s in seen), (before, seen)
    [new] = ingress.gateway_pods()
    assert new["name"] != old["name"] and new["netns"] != old["netns"] and new["ip"] != old["ip"]
    pod = yaml.safe_load(ingress.ctl("get", "pod", new["name"], "-n", NS, "-o", "yaml").stdout)
    assert pod["metadata"]["annotations"][PUBLISHED_ANNOTATION] == old["annotations"][PUBLISHED_ANNOTATION]
    assert new["forwarder"] == old["forwarder"] and len(forwarders()) == 1  # the same process, re-targeted
    events = (ingress.dir / "logs" / "controller.log").read_text().splitlines()
    rolled_events = [e for e in events if '"event": "waypoint rolled"' in e and f'"{NS}/ingress"' in e]
    assert len(rolled_events) == 1 and f'"pod": "{new["name"]}"' in rolled_events[0], rolled_events


def test_a_service_with_a_waypoint_is_reached_through_it(ingress: Ingress) -> None:
    """As Istio's ingress does: to a service bound to a waypoint, the gateway goes through the waypoint
    (whose access log shows the gateway as the caller), and the app sees the waypoint.  Last: it changes
    the namespace for good."""
    ingress.apply_docs([{**policy(GATEWAY_PRINCIPAL), "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {
        "principals": [GATEWAY_PRINCIPAL, f"cluster.local/ns/{NS}/sa/waypoint"]}}]}]}}])
    ingress.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")
    address = ingress.published()["http"]
    log = ingress.dir / "logs" / f"{NS}.waypoint.log"

    def through_waypoint() -> bool:
        """a request through the gateway shows in the waypoint's access log with the gateway's identity"""
        status, body = answer(ingress.curl(f"http://{address}/api/via", "-H", "Host: shop.example.com"))
        lines = log.read_text().splitlines() if log.exists() else []
        seen = [e for line in lines if line.startswith("{") and "response_code" in (e := yaml.safe_load(line))]
        return status == 200 and body["app"] == "api" and any(
            e["path"] == "/api/via" and e["downstream_principal"] == f"spiffe://{GATEWAY_PRINCIPAL}" for e in seen)

    eventually(through_waypoint, timeout=60, interval=0.5)


def forwarders() -> list[str]:
    """The host port forwarders of this cluster still running (their environment names the cluster)."""
    out = subprocess.run(["ps", "-e", "-ww", "-o", "args=", "e"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if "localcluster.hostports" in line and f"AMB_CLUSTER={CLUSTER} " in line + " "]


def test_deleting_the_gateway_unpublishes_it(ingress: Ingress) -> None:
    address = ingress.published()["http"]
    assert forwarders()
    gateway = next(d for d in gateway_docs(ingress.cert or server_cert("x")) if d["kind"] == "Gateway")
    ingress.delete(yaml.safe_dump(gateway), ingress.files)

    def gone() -> bool:
        """the gateway's pod, its host ports and its forwarder are gone"""
        pods = ingress.ctl("get", "pods", "-n", NS).stdout
        return not forwarders() and ingress.curl(f"http://{address}/").returncode != 0 and \
            not any(line.startswith("ingress ") for line in pods.splitlines())

    eventually(gone, timeout=30, interval=0.5)
