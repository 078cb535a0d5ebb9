"""Gateway API routes through a real waypoint: bookinfo in the mesh with a waypoint for its namespace, an
echo app that answers with the path and headers it got, and HTTPRoutes attached to Services.  Each test
applies its routes, waits until the waypoint runs them (its config dump names the routes' configuration
for the service), checks the behaviour over requests made inside the sleep pod, and removes them; the
routes' status is read as a user reads it, with `meshctl get httproute NAME -o yaml`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Meshctl, cluster_file
from tests.integration.test_mesh import eventually
from tests.integration.test_waypoint import CLIENT, NS, WaypointMesh

CLUSTER = "t-route"
GATEWAY_API = "gateway.networking.k8s.io/v1"

# Answers every request with its method, path and the headers named in SHOWN (for the app's view of a route).
ECHO_SERVER = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHOWN = ("x-route", "x-drop", "end-user")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = {"path": self.path, "version": "echo",
                "headers": {k: self.headers[k] for k in SHOWN if self.headers.get(k) is not None}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
'''


def extra_resources(echo: Path) -> str:
    """The echo app and its Service, and one Service per reviews version (what HTTPRoutes split over)."""
    versions = "".join(f"""
---
apiVersion: v1
kind: Service
metadata: {{name: reviews-{v}, namespace: {NS}}}
spec:
  selector: {{app: reviews, version: {v}}}
  ports: [{{name: http, port: 9080}}]
""" for v in ("v1", "v2"))
    return versions + f"""
---
apiVersion: v1
kind: Pod
metadata:
  name: echo
  namespace: {NS}
  labels: {{app: echo, version: v1}}
spec:
  nodeName: node-2
  containers:
  - command: [{sys.executable}, {echo}, "8080"]
    ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NS}}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 8080}}]
"""


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[WaypointMesh]:
    tools = pod_files("route-tools")  # pods run echo.py and client.py as their own users
    (tools / "echo.py").write_text(ECHO_SERVER)
    (tools / "client.py").write_text(CLIENT)
    path = cluster_file(tmp_path_factory.mktemp("route"), CLUSTER)
    path.write_text(path.read_text() + extra_resources(tools / "echo.py"))
    m = WaypointMesh(CLUSTER, meshctl)
    m.tools = tools
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")
        eventually(m.waypoint_ready, timeout=60)

        def services_known() -> bool:
            """the waypoint knows the echo service"""
            return f"echo.{NS}.svc.cluster.local" in m.waypoint_config().get("services", [])

        eventually(services_known, timeout=30)

        def through_waypoint() -> bool:
            """the echo service's traffic reaches the waypoint"""
            answer = m.load("echo", "/ready", port=8080)
            return answer["status"].get("200") == 1 and any(e["authority"] == "echo:8080" for e in m.waypoint_access_log())

        eventually(through_waypoint, timeout=60, interval=1.0)
        yield m
    finally:
        meshctl("cluster", "down", CLUSTER, check=False)


def routed(mesh: WaypointMesh, service: str) -> bool:
    """Does the waypoint route `service` by Gateway API routes?"""
    host = f"{service}.{NS}.svc.cluster.local"
    return mesh.waypoint_config().get("virtual_services", {}).get(host) == f"{NS}/gateway-api~{service}"


@pytest.fixture
def routes(mesh: WaypointMesh) -> Iterator[Callable[..., None]]:
    """`routes(service, *docs)`: applies the routes and waits until the waypoint runs them for `service`;
    afterwards they are removed and the waypoint is seen without them."""
    applied: list[tuple[str, list[dict[str, Any]]]] = []

    def apply(service: str, *docs: dict[str, Any]) -> None:
        mesh.apply_yaml(list(docs))
        applied.append((service, list(docs)))
        eventually(lambda: routed(mesh, service), timeout=20, interval=0.3)

    yield apply
    for service, docs in reversed(applied):
        mesh.delete(yaml.safe_dump_all(docs), mesh.tools)
        eventually(lambda s=service: not routed(mesh, s), timeout=20, interval=0.3)  # type: ignore[misc]


def http_route(name: str, service: str, port: int, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "HTTPRoute", "metadata": {"name": name, "namespace": NS},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": service, "port": port}], "rules": rules}}


def backend(name: str, port: int = 9080, weight: int | None = None) -> dict[str, Any]:
    return {"name": name, "port": port, **({"weight": weight} if weight is not None else {})}


def status_of(mesh: WaypointMesh, name: str) -> dict[str, dict[str, str]]:
    """`meshctl get httproute NAME -o yaml`: each condition of the first parent, by type."""
    body = yaml.safe_load(mesh.ctl("get", "httproute", name, "-n", NS, "-o", "yaml").stdout)
    parent = body["status"]["parents"][0]
    return {c["type"]: c for c in parent["conditions"]}


def test_weighted_split_90_10(mesh: WaypointMesh, routes: Callable[..., None]) -> None:
    routes("reviews", http_route("reviews-split", "reviews", 9080,
                                 [{"backendRefs": [backend("reviews-v1", weight=90), backend("reviews-v2", weight=10)]}]))
    n = 300
    answer = mesh.load("reviews", "/reviews/0", n=n)
    assert answer["status"] == {"200": n}, answer
    versions = answer["version"]
    assert set(versions) <= {"v1", "v2"}, versions  # never v3: only the route's backends
    # Binomial(300, 0.1): standard deviation 5.2 requests; 5 of them either side.
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(versions.get("v2", 0) - n * 0.1) < 5 * sd, versions
    table = mesh.ctl("get", "httproutes", "-n", NS).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "HOSTNAMES", "PARENTS"]
    assert table[1].split()[:3] == ["reviews-split", "<none>", "reviews"]
    status = status_of(mesh, "reviews-split")
    assert (status["Accepted"]["status"], status["Accepted"]["reason"]) == ("True", "Accepted")
    assert (status["ResolvedRefs"]["status"], status["ResolvedRefs"]["reason"]) == ("True", "ResolvedRefs")


def test_header_match(mesh: WaypointMesh, routes: Callable[..., None]) -> None:
    routes("reviews", http_route("reviews-jason", "reviews", 9080, [
        {"matches": [{"headers": [{"name": "end-user", "value": "jason"}]}], "backendRefs": [backend("reviews-v2")]},
        {"backendRefs": [backend("reviews-v1")]},
    ]))
    assert mesh.load("reviews", "/reviews/0", n=20, headers={"end-user": "jason"})["version"] == {"v2": 20}
    assert mesh.load("reviews", "/reviews/0", n=20, headers={"end-user": "someone"})["version"] == {"v1": 20}


def test_path_prefix_rewrite_and_request_headers(mesh: WaypointMesh, routes: Callable[..., None]) -> None:
    routes("echo", http_route("echo-api", "echo", 8080, [{
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
        "filters": [
            {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1"}}},
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "x-route", "value": "echo-api"}], "remove": ["x-drop"]}},
        ],
        "backendRefs": [backend("echo", port=8080)],
    }]))
    answer = mesh.load("echo", "/api/items?page=2", port=8080, headers={"x-drop": "secret", "end-user": "jason"})
    assert answer["status"] == {"200": 1}, answer
    seen = json.loads(answer["bodies"]["200"])
    assert seen["path"] == "/v1/items?page=2"
    assert seen["headers"] == {"x-route": "echo-api", "end-user": "jason"}
    # The prefix is segment-wise, and the route is the service's only one: /apix matches no rule.
    assert mesh.load("echo", "/apix", port=8080)["status"] == {"404": 1}


def test_missing_backend_is_reported_in_status(mesh: WaypointMesh, routes: Callable[..., None]) -> None:
    routes("echo", http_route("echo-missing", "echo", 8080, [{"backendRefs": [backend("no-such-service", port=8080)]}]))
    status = status_of(mesh, "echo-missing")
    assert (status["Accepted"]["status"], status["Accepted"]["reason"]) == ("True", "Accepted")
    resolved = status["ResolvedRefs"]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert "no-such-service" in resolved["message"]
    assert mesh.load("echo", "/x", port=8080)["status"] == {"500": 1}  # the Gateway API's answer for it
