"""A waypoint for real: bookinfo in the mesh, `meshctl waypoint apply -n bookinfo --enroll-namespace`, and
the namespace's service traffic carried sleep -> node agent -> HBONE -> waypoint (L7) -> HBONE -> node
agent -> pod.  One cluster per capture mode (iptables, then eBPF: every test runs in both); each test applies its configuration, waits until the waypoint
reports it in its config dump, checks the behaviour over many requests made inside the sleep pod, and
removes what it applied.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.conftest import Meshctl, cluster_file
from tests.integration.test_mesh import Mesh, eventually

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "istio"
NS = "bookinfo"
SLEEP_PRINCIPAL = "cluster.local/ns/bookinfo/sa/sleep"

# A small HTTP server with behaviours to retry and time out against: /fail-once/<key> answers 503 the
# first time, /status/<n> answers n, /slow/<seconds> waits, /count/<path> says how often <path> was asked.
FLAKY_SERVER = '''
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        parts = self.path.split("/")
        if parts[1] == "count":
            n = seen.get("/" + "/".join(parts[2:]), 0)
            return self.reply(200, {"count": n})
        with lock:
            seen[self.path] = n = seen.get(self.path, 0) + 1
        status = 200
        if parts[1] == "fail-once" and n == 1:
            status = 503
        elif parts[1] == "status":
            status = int(parts[2].partition("?")[0])
        elif parts[1] == "slow":
            time.sleep(float(parts[2]))
        self.reply(status, {"path": self.path, "seen": n})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("flaky listening", flush=True)
server.serve_forever()
'''

# Runs inside the sleep pod: N requests (kept-alive connection, reopened when the server closes it) and
# a summary of statuses, versions and durations on stdout.
CLIENT = '''
import http.client, json, sys, time

spec = json.loads(sys.argv[1])
out = {"status": {}, "version": {}, "durations": [], "bodies": {}}
conn = None
for _ in range(spec["n"]):
    start = time.monotonic()
    for attempt in (1, 2):
        fresh = conn is None
        if fresh:
            conn = http.client.HTTPConnection(spec["host"], spec.get("port", 9080), timeout=spec.get("timeout", 10))
        try:
            conn.request(spec.get("method", "GET"), spec["path"], body=spec.get("body"), headers=spec.get("headers", {}))
            resp = conn.getresponse()
            body = resp.read()
            status = str(resp.status)
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
            break
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            conn = None
            status, body = "error " + type(exc).__name__, str(exc).encode()
            if fresh:
                break
    out["durations"].append(round(time.monotonic() - start, 3))
    out["status"][status] = out["status"].get(status, 0) + 1
    out["bodies"].setdefault(status, body[:300].decode(errors="replace"))
    try:
        version = json.loads(body).get("version", "")
    except ValueError:
        version = ""
    if version:
        out["version"][version] = out["version"].get(version, 0) + 1
print(json.dumps(out))
'''


def flaky_pod(server: Path) -> str:
    return f"""
---
apiVersion: v1
kind: Pod
metadata:
  name: flaky
  namespace: bookinfo
  labels: {{app: flaky, version: v1}}
spec:
  nodeName: node-2
  containers:
  - command: [{sys.executable}, {server}, "8080"]
    ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata:
  name: flaky
  namespace: bookinfo
spec:
  selector: {{app: flaky}}
  ports: [{{name: http, port: 8080}}]
"""


class WaypointMesh(Mesh):
    tools: Path = Path()  # set by the fixture: the pods' helper scripts

    @property
    def waypoint_netns(self) -> str:
        return self.pod_netns(NS, "waypoint")

    def in_waypoint(self, url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.waypoint_netns, "curl", "-sS", "-m", "5", url],
                              capture_output=True, text=True)

    def waypoint_config(self) -> dict[str, Any]:
        out = self.in_waypoint("http://127.0.0.1:15000/config_dump")
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.startswith("{") else {}

    def waypoint_ready(self) -> bool:
        return self.in_waypoint("http://127.0.0.1:15021/healthz/ready").stdout.strip() == "ready"

    def waypoint_metrics(self) -> str:
        return self.in_waypoint("http://127.0.0.1:15020/metrics").stdout

    def waypoint_access_log(self) -> list[dict[str, Any]]:
        path = self.dir / "logs" / f"{NS}.waypoint.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for line in lines if line.startswith("{") and "response_code" in (e := json.loads(line))]

    def load(self, host: str, path: str, n: int = 1, port: int = 9080, **extra: Any) -> dict[str, Any]:
        spec = {"host": host, "port": port, "path": path, "n": n, **extra}
        out = self.exec(NS, "sleep", sys.executable, str(self.tools / "client.py"), json.dumps(spec), timeout=300)
        return json.loads(out.stdout)

    def apply_yaml(self, docs: list[dict[str, Any]]) -> str:
        text = yaml.safe_dump_all(docs)
        self.apply(text, self.tools)
        return text


def fixture(name: str) -> list[dict[str, Any]]:
    """An Istio sample from tests/fixtures, moved to the bookinfo namespace (and its sleep client)."""
    text = (FIXTURES / name).read_text().replace(".default.svc", ".bookinfo.svc")
    text = text.replace("cluster.local/ns/default/sa/curl", SLEEP_PRINCIPAL)
    docs = [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        d["metadata"]["namespace"] = NS
    return docs


def named(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    for d in docs:
        d["metadata"]["name"] = name
    return docs


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def mesh(request: pytest.FixtureRequest, meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[WaypointMesh]:
    mode = request.param
    name = "t-waypoint" if mode == "iptables" else f"t-waypoint-{mode}"
    tools = pod_files("waypoint-tools")  # pods run flaky.py and client.py as their own users
    (tools / "flaky.py").write_text(FLAKY_SERVER)
    (tools / "client.py").write_text(CLIENT)
    path = cluster_file(tmp_path_factory.mktemp("waypoint"), name)
    path.write_text(path.read_text() + flaky_pod(tools / "flaky.py"))
    m = WaypointMesh(name, meshctl, mode)
    m.tools = tools
    try:
        meshctl("cluster", "up", "-f", str(path), "--redirect-mode", mode)
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")

        def waypoint_running() -> bool:
            status = m.status()
            return (any(p["name"] == f"waypoint {NS}/waypoint" for p in status["processes"])
                    and any(p["namespace"] == NS and p["name"] == "waypoint" for p in status["plan"]["pods"]))

        eventually(waypoint_running, timeout=60)
        eventually(m.waypoint_ready, timeout=60)

        def services_known() -> bool:
            return "reviews.bookinfo.svc.cluster.local" in m.waypoint_config().get("services", [])

        eventually(services_known, timeout=30)
        m.apply_yaml(fixture("destination-rule-all.yaml"))

        def through_waypoint() -> bool:
            """bookinfo's service traffic reaches the waypoint"""
            answer = m.load("reviews", "/reviews/0")
            return answer["status"].get("200") == 1 and any(
                e["authority"] == "reviews:9080" for e in m.waypoint_access_log())

        eventually(through_waypoint, timeout=60, interval=1.0)
        yield m
    finally:
        meshctl("cluster", "down", name, check=False)


def wait_for(mesh: WaypointMesh, what: str, check: Any, timeout: float = 20.0) -> None:
    def applied() -> bool:
        return bool(check(mesh.waypoint_config()))

    applied.__doc__ = f"the waypoint has {what}"
    eventually(applied, timeout=timeout, interval=0.3)


def vs_for(mesh: WaypointMesh, host: str) -> str:
    return str(mesh.waypoint_config().get("virtual_services", {}).get(f"{host}.{NS}.svc.cluster.local", ""))


@pytest.fixture
def applied(mesh: WaypointMesh) -> Iterator[list[list[dict[str, Any]]]]:
    """Configuration a test applies; removed after it, and the waypoint seen without it."""
    docs: list[list[dict[str, Any]]] = []
    yield docs
    for batch in reversed(docs):
        mesh.delete(yaml.safe_dump_all(batch), mesh.tools)
    keys = {f"{d['metadata']['namespace']}/{d['metadata']['name']}" for batch in docs for d in batch}

    def gone(cfg: dict[str, Any]) -> bool:
        present = set(cfg.get("virtual_services", {}).values()) | set(cfg.get("authorization_policies", []))
        return bool(cfg) and not (present & keys)

    wait_for(mesh, "forgotten the test's configuration", gone)


def apply(mesh: WaypointMesh, applied: list[list[dict[str, Any]]], docs: list[dict[str, Any]]) -> None:
    mesh.apply_yaml(docs)
    applied.append(docs)


def fraction(answer: dict[str, Any], key: str, value: str) -> float:
    counts = answer[key]
    return counts.get(value, 0) / max(1, sum(counts.values()))


# ---- the waypoint itself -------------------------------------------------------------------------


def test_waypoint_pod_carries_the_namespace_traffic(mesh: WaypointMesh) -> None:
    answer = json.loads(mesh.curl(NS, "sleep", "http://productpage:9080/productpage").stdout)
    assert answer["pod"] == "productpage-v1" and answer["reviews"]["service"] == "reviews"
    entries = mesh.waypoint_access_log()
    assert any(e["authority"] == "productpage:9080" and e["downstream_principal"] ==
               f"spiffe://{SLEEP_PRINCIPAL}" and e["response_code"] == 200 for e in entries)
    # productpage's own calls went through the waypoint too, with productpage's identity.
    assert any(e["authority"] == "details:9080" and
               e["downstream_principal"].endswith("/sa/bookinfo-productpage") for e in entries)
    config = mesh.waypoint_config()
    assert config["identity"] == "spiffe://cluster.local/ns/bookinfo/sa/waypoint" and config["synced"]
    assert config["destination_rules"]  # the subsets of destination-rule-all


# ---- routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sample", "v1_share"), [("virtual-service-reviews-80-20.yaml", 0.8),
                                                  ("virtual-service-reviews-95-5.yaml", 0.95)])
def test_weighted_routing(mesh: WaypointMesh, applied: list, sample: str, v1_share: float) -> None:
    name = sample.removeprefix("virtual-service-").removesuffix(".yaml")
    apply(mesh, applied, named(fixture(sample), name))
    wait_for(mesh, f"VirtualService {name}", lambda cfg: vs_for(mesh, "reviews") == f"{NS}/{name}")
    answer = mesh.load("reviews", "/reviews/0", n=200)
    assert answer["status"] == {"200": 200}, answer
    assert abs(fraction(answer, "version", "v1") - v1_share) <= 0.10, answer["version"]
    assert set(answer["version"]) <= {"v1", "v2"}


def test_header_match_sends_jason_to_v2(mesh: WaypointMesh, applied: list) -> None:
    apply(mesh, applied, named(fixture("virtual-service-reviews-jason-v2-v3.yaml"), "reviews-jason"))
    wait_for(mesh, "VirtualService reviews-jason", lambda cfg: vs_for(mesh, "reviews") == f"{NS}/reviews-jason")
    jason = mesh.load("reviews", "/reviews/0", n=20, headers={"end-user": "jason"})
    others = mesh.load("reviews", "/reviews/0", n=20, headers={"end-user": "mallory"})
    assert jason["version"] == {"v2": 20} and others["version"] == {"v3": 20}


def test_uri_prefix_match_with_rewrite(mesh: WaypointMesh, applied: list) -> None:
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "reviews-new", "namespace": NS},
          "spec": {"hosts": ["reviews"], "http": [
              {"name": "new", "match": [{"uri": {"prefix": "/new/"}}], "rewrite": {"uri": "/"},
               "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
              {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}}
    apply(mesh, applied, [vs])
    wait_for(mesh, "VirtualService reviews-new", lambda cfg: vs_for(mesh, "reviews") == f"{NS}/reviews-new")
    new = mesh.load("reviews", "/new/reviews/0", n=20)
    old = mesh.load("reviews", "/reviews/0", n=20)
    assert new["status"] == {"200": 20} and new["version"] == {"v2": 20}  # the app saw /reviews/0
    assert old["version"] == {"v1": 20}


# ---- fault injection -----------------------------------------------------------------------------


def test_delays_and_aborts_with_their_percentages(mesh: WaypointMesh, applied: list) -> None:
    def route(prefix: str, fault: dict[str, Any]) -> dict[str, Any]:
        return {"match": [{"uri": {"prefix": prefix}}], "fault": fault,
                "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}

    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "reviews-faults", "namespace": NS},
          "spec": {"hosts": ["reviews"], "http": [
              route("/reviews/1", {"delay": {"fixedDelay": "2s", "percentage": {"value": 100}}}),
              route("/reviews/2", {"abort": {"httpStatus": 400, "percentage": {"value": 100}}}),
              route("/reviews/3", {"abort": {"httpStatus": 500, "percentage": {"value": 50}}}),
              route("/", {"delay": {"fixedDelay": "2s", "percentage": {"value": 0.1}}})]}}
    apply(mesh, applied, [vs])
    wait_for(mesh, "VirtualService reviews-faults", lambda cfg: vs_for(mesh, "reviews") == f"{NS}/reviews-faults")
    delayed = mesh.load("reviews", "/reviews/1", n=2)
    assert delayed["status"] == {"200": 2} and all(2.0 <= d < 3.5 for d in delayed["durations"]), delayed
    aborted = mesh.load("reviews", "/reviews/2", n=20)
    assert aborted["status"] == {"400": 20} and aborted["bodies"]["400"] == "fault filter abort"
    half = mesh.load("reviews", "/reviews/3", n=200)
    assert set(half["status"]) <= {"200", "500"} and abs(fraction(half, "status", "500") - 0.5) <= 0.13, half["status"]
    rare = mesh.load("reviews", "/reviews/0", n=300)
    assert rare["status"] == {"200": 300}
    assert sum(1 for d in rare["durations"] if d >= 2.0) <= 3  # 0.1%: expect about 0.3 of 300


# ---- security ------------------------------------------------------------------------------------


def test_productpage_viewer_allows_get_only(mesh: WaypointMesh, applied: list) -> None:
    policy = fixture("authorization-policy-waypoint.yaml")[:1]  # productpage-viewer, targetRefs its Service
    apply(mesh, applied, policy)
    wait_for(mesh, "policy productpage-viewer",
             lambda cfg: f"{NS}/productpage-viewer" in cfg.get("authorization_policies", []))
    get = mesh.load("productpage", "/productpage", n=5)
    post = mesh.load("productpage", "/productpage", n=5, method="POST", body="{}")
    assert get["status"] == {"200": 5}, get
    assert post["status"] == {"403": 5} and post["bodies"]["403"] == "RBAC: access denied"


def test_jwt_valid_invalid_and_missing(mesh: WaypointMesh, applied: list) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "test-key", "alg": "ES256", "use": "sig"}]})
    now = datetime.datetime.now(datetime.UTC)
    claims = {"iss": "issuer@bookinfo.test", "sub": "alice", "iat": now, "exp": now + datetime.timedelta(hours=1)}
    valid = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "test-key"})
    forged = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "test-key"})
    target = [{"kind": "Service", "group": "", "name": "details"}]
    docs = [
        {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
         "metadata": {"name": "details-jwt", "namespace": NS},
         "spec": {"targetRefs": target, "jwtRules": [{"issuer": "issuer@bookinfo.test", "jwks": jwks}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "details-require-jwt", "namespace": NS},
         "spec": {"targetRefs": target, "action": "ALLOW",
                  "rules": [{"from": [{"source": {"requestPrincipals": ["issuer@bookinfo.test/*"]}}]}]}},
    ]
    apply(mesh, applied, docs)
    wait_for(mesh, "the JWT rule and policy", lambda cfg: cfg.get("jwt_rules") and
             f"{NS}/details-require-jwt" in cfg.get("authorization_policies", []))
    ok = mesh.load("details", "/details/0", n=3, headers={"authorization": f"Bearer {valid}"})
    bad = mesh.load("details", "/details/0", n=3, headers={"authorization": f"Bearer {forged}"})
    missing = mesh.load("details", "/details/0", n=3)
    assert ok["status"] == {"200": 3}, ok
    assert bad["status"] == {"401": 3}, bad
    assert missing["status"] == {"403": 3} and missing["bodies"]["403"] == "RBAC: access denied"


# ---- resilience ----------------------------------------------------------------------------------


def test_retries_and_timeouts(mesh: WaypointMesh, applied: list) -> None:
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "flaky", "namespace": NS},
          "spec": {"hosts": ["flaky"], "http": [
              {"match": [{"uri": {"prefix": "/slow/"}}], "timeout": "0.5s",
               "route": [{"destination": {"host": "flaky"}}]},
              {"retries": {"attempts": 3, "retryOn": "5xx", "perTryTimeout": "2s"},
               "route": [{"destination": {"host": "flaky"}}]}]}}
    apply(mesh, applied, [vs])
    wait_for(mesh, "VirtualService flaky", lambda cfg: vs_for(mesh, "flaky") == f"{NS}/flaky")
    key = uuid.uuid4().hex
    once = mesh.load("flaky", f"/fail-once/{key}", port=8080)
    assert once["status"] == {"200": 1} and json.loads(once["bodies"]["200"])["seen"] == 2  # retried once
    always = mesh.load("flaky", f"/status/503?k={key}", port=8080)
    assert always["status"] == {"503": 1} and json.loads(always["bodies"]["503"])["seen"] == 4  # the endpoint's own
    count = mesh.load("flaky", f"/count/status/503?k={key}", port=8080)
    assert json.loads(count["bodies"]["200"])["count"] == 4  # the first try and three retries
    started = time.monotonic()
    slow = mesh.load("flaky", "/slow/3", port=8080)
    assert slow["status"] == {"504": 1} and slow["bodies"]["504"] == "upstream request timeout"
    assert slow["durations"][0] < 1.5 and time.monotonic() - started < 10


# ---- telemetry -----------------------------------------------------------------------------------


def test_request_metrics_reported_by_the_waypoint(mesh: WaypointMesh) -> None:
    mesh.load("reviews", "/reviews/0", n=5)
    metrics = mesh.waypoint_metrics()
    lines = [line for line in metrics.splitlines() if line.startswith("istio_requests_total{")]
    reviews = [line for line in lines if 'reporter="waypoint"' in line and
               'destination_service="reviews.bookinfo.svc.cluster.local"' in line and 'response_code="200"' in line]
    assert reviews, "\n".join(lines)
    assert any(f'source_principal="spiffe://{SLEEP_PRINCIPAL}"' in line and 'destination_app="reviews"' in line
               for line in reviews)
    assert any('response_flags="FI"' in line for line in lines)  # the aborts of the fault test
    assert "waypoint_xds_connected 1.0" in metrics


def test_telemetry_turns_the_waypoints_access_log_off_and_on(mesh: WaypointMesh) -> None:
    quiet = [{"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry", "metadata": {"name": "quiet", "namespace": NS},
              "spec": {"accessLogging": [{"disabled": True}]}}]
    text = mesh.apply_yaml(quiet)
    try:
        wait_for(mesh, "Telemetry quiet", lambda cfg: cfg.get("access_log") == {
            "enabled": False, "telemetry": [f"{NS}/quiet"]})
        before = len(mesh.waypoint_access_log())
        assert mesh.load("reviews", "/reviews/0", n=5)["status"] == {"200": 5}
        assert len(mesh.waypoint_access_log()) == before
    finally:
        mesh.delete(text, mesh.tools)
    wait_for(mesh, "no Telemetry quiet", lambda cfg: cfg.get("access_log", {}).get("enabled") is True)
    assert mesh.load("reviews", "/reviews/0", n=2)["status"] == {"200": 2}
    eventually(lambda: len(mesh.waypoint_access_log()) >= before + 2, timeout=10, interval=0.3)


def test_down_with_a_waypoint_leaves_nothing(mesh: WaypointMesh, meshctl: Meshctl) -> None:
    """Last in this module: it removes the cluster.  The controller that makes waypoint pods must not
    bring back any namespace while `down` removes them."""
    from tests.integration.conftest import leftovers

    meshctl("cluster", "down", mesh.name)
    assert leftovers(mesh.name) == []
