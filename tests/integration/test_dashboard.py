"""`meshctl dashboard` for real, in a real browser: bookinfo in the mesh behind a waypoint, the cluster's
Prometheus scraping every second, its proxies exporting spans to the dashboard (which receives OTLP/HTTP on
the underlay's gateway), and Debian's Chromium, headless, driven over the Chrome DevTools protocol.

- the graph's edges and mTLS locks are what was sent: N requests sleep -> details through the waypoint are
  N more on that edge (exact once Prometheus scraped, within the scrape interval), locked; plaintext from
  the `legacy` namespace (outside the mesh) to ratings is an edge without the lock;
- a trace crossing productpage -> reviews -> ratings through the waypoint opens as a waterfall with spans
  from at least three proxies;
- the workload view shows identity, pods, policies and routes; the health view the control plane, agents
  and waypoint with their config versions and the certificates;
- a Prometheus that does not answer is a banner, not an error page;
- screenshots are taken into the test's temporary folder; with MESH_UPDATE_SCREENSHOTS=1 into docs/images/
  (the README shows one), so that a test run leaves the checkout as it was.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket  # websocket-client (a dependency of the kubernetes client)

from tests.integration.conftest import ROOT, Meshctl, cluster_file, leftovers
from tests.integration.test_mesh import eventually
from tests.integration.test_observability import ObservedMesh, fresh_tunnels_to_ratings
from tests.integration.test_waypoint import CLIENT, NS

NAME = "t-dash"
GATEWAY = "172.30.0.1"
CHROMIUM = "/usr/bin/chromium"
DOC_IMAGES = ROOT / "docs" / "images"
WIDTH, HEIGHT = 1400, 900
READY_JS = "document.body !== null && document.body.dataset.ready === '1'"

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (make setup installs it)")


# ---- a small Chrome DevTools protocol client ---------------------------------------------------------------


class Browser:
    """Headless Chromium with a fresh profile, one page, driven over CDP (a websocket, JSON messages)."""

    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="t-dash-chromium."))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        eventually(port_file.exists, timeout=30)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.errors: list[str] = []  # exceptions the page threw
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def js(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def open(self, url: str) -> None:
        """Load `url` afresh (from a blank page, so that a change of fragment alone is a new load too)."""
        self.call("Page.navigate", url="about:blank")
        eventually(lambda: self.js("location.href") == "about:blank", timeout=10)
        self.call("Page.navigate", url=url)
        eventually(lambda: self.js(READY_JS), timeout=20)

    def wait(self, expression: str, timeout: float = 20) -> Any:
        return eventually(lambda: self.js(expression), timeout=timeout, interval=0.3)

    def screenshot(self, path: Path) -> None:
        height = int(self.js("Math.max(document.body.scrollHeight, 600)"))
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=min(height, 2400), deviceScaleFactor=1,
                  mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# ---- the cluster and the dashboard ------------------------------------------------------------------------


class DashMesh(ObservedMesh):
    url: str = ""

    def api(self, path: str, url: str = "") -> dict[str, Any]:
        with urllib.request.urlopen((url or self.url).rstrip("/") + path, timeout=10) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    def edge(self, graph: dict[str, Any], src: str, dst: str, src_ns: str = NS) -> dict[str, Any] | None:
        return next((e for e in graph["edges"] if (e["source"], e["destination"], e["source_namespace"]) ==
                     (src, dst, src_ns)), None)


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[DashMesh]:
    tools = pod_files("dash-tools")  # the sleep pod runs client.py as its own user
    (tools / "client.py").write_text(CLIENT)
    path = cluster_file(tmp_path_factory.mktemp("dash"), NAME)
    m = DashMesh(NAME, meshctl)
    m.tools = tools
    try:
        meshctl("cluster", "up", "-f", str(path), "--scrape-interval", "1",
                "--otlp-endpoint", f"http://{GATEWAY}:4318/v1/traces")
        out = meshctl("dashboard", "--cluster", NAME, "--port", "0", "--detach").stdout
        m.url = json.loads((m.dir / "dashboard.json").read_text())["url"]
        assert m.url in out and f"receiving spans (OTLP/HTTP) on http://{GATEWAY}:4318/v1/traces" in out
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")
        eventually(m.waypoint_ready, timeout=60)
        eventually(lambda: "reviews.bookinfo.svc.cluster.local" in m.waypoint_config().get("services", []), timeout=30)
        m.apply_yaml([{"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
                       "metadata": {"name": "mesh-default", "namespace": "istio-system"},
                       "spec": {"tracing": [{"randomSamplingPercentage": 100.0}]}}])
        eventually(lambda: m.waypoint_config().get("tracing", {}).get("sampling") == 100.0, timeout=20)
        eventually(lambda: m.load("details", "/details/0")["status"].get("200") == 1 and any(
            e["authority"] == "details:9080" for e in m.waypoint_access_log()), timeout=60, interval=1.0)
    except BaseException:
        for log in ("controller", f"{NS}.waypoint", "dashboard"):
            path = m.dir / "logs" / f"{log}.log"
            tail = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else ["(none)"]
            print(f"--- {log}.log\n" + "\n".join(tail))
        meshctl("cluster", "down", NAME, check=False)
        raise
    try:
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False)
        assert leftovers(NAME) == []


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go (see the module's docstring)."""
    return DOC_IMAGES if os.environ.get("MESH_UPDATE_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def productpage(mesh: DashMesh, calls: int = 10) -> str:
    """Calls productpage from sleep until one answer came through reviews v2 or v3 (which call ratings);
    the request id of that one."""
    found = ""
    for _ in range(max(calls, 20)):
        request_id = str(uuid.uuid4())
        out = mesh.curl(NS, "sleep", "http://productpage:9080/productpage", "-H", f"x-request-id: {request_id}")
        answer = json.loads(out.stdout)
        if not found and "ratings" in answer["reviews"]:
            found = request_id
        calls -= 1
        if found and calls <= 0:
            return found
    assert found, "no request reached reviews v2 or v3"
    return found


def test_graph_edges_and_locks_are_what_was_sent(mesh: DashMesh, browser: Browser, images: Path) -> None:
    productpage(mesh)
    edge_before = mesh.edge(mesh.api(f"/api/graph?namespace={NS}"), "sleep", "details-v1")
    before = edge_before["requests"] if edge_before else 0
    n = 23
    assert mesh.load("details", "/details/0", n=n)["status"] == {"200": n}
    plain = 7
    for _ in range(plain):  # from outside the mesh: no lock
        assert mesh.curl("legacy", "sleep", "http://ratings.bookinfo:9080/ratings/1").returncode == 0

    def counted() -> dict[str, Any] | None:
        """the graph has all N requests of sleep -> details and the plaintext connections"""
        g = mesh.api(f"/api/graph?namespace={NS}")
        e = mesh.edge(g, "sleep", "details-v1")
        legacy = mesh.edge(g, "sleep", "ratings-v1", "legacy")
        return g if e and e["requests"] == before + n and legacy and legacy["connections"] >= plain else None

    graph: dict[str, Any] = eventually(counted, timeout=30, interval=0.5)  # type: ignore[assignment]
    time.sleep(2.5)  # two more scrapes: not one request more
    settled = mesh.edge(mesh.api(f"/api/graph?namespace={NS}"), "sleep", "details-v1")
    assert settled is not None and settled["requests"] == before + n
    details = mesh.edge(graph, "sleep", "details-v1")
    assert details is not None and details["mtls"] is True and details["waypoint"] == f"{NS}/waypoint"
    assert details["errors"] == 0 and details["error_rate"] == 0 and details["p99"] is not None
    legacy = mesh.edge(graph, "sleep", "ratings-v1", "legacy")
    assert legacy is not None and legacy["mtls"] is False and legacy["protocol"] == "tcp"
    assert mesh.edge(graph, "productpage-v1", "details-v1") is not None
    assert {n["id"] for n in graph["nodes"]} >= {f"waypoint:{NS}/waypoint", "service:details.bookinfo.svc.cluster.local"}

    # The page shows the same: its edge table and the locks on the drawn links.
    browser.open(mesh.url + f"#/graph?namespace={NS}")
    browser.wait("document.querySelectorAll('tr.edge').length > 0 && document.querySelector('#graph-svg') !== null")
    rows = browser.js("""[...document.querySelectorAll('tr.edge')].map(r => ({...r.dataset}))""")
    shown = next(r for r in rows if r["source"] == "sleep" and r["sourceNamespace"] == NS and r["destination"] == "details-v1")
    assert int(shown["requests"]) >= before + n and shown["mtls"] == "true" and shown["waypoint"] == f"{NS}/waypoint"
    plain_row = next(r for r in rows if r["sourceNamespace"] == "legacy" and r["destination"] == "ratings-v1")
    assert plain_row["mtls"] == "false"
    links = browser.js("""[...document.querySelectorAll('g.link')].map(g => ({source: g.dataset.source,
        target: g.dataset.target, via: g.dataset.via, mtls: g.dataset.mtls,
        hops: Object.fromEntries([...g.querySelectorAll('.hop')].map(x => [x.dataset.hop,
            x.querySelector('.lock') !== null ? 'lock' : x.querySelector('.unlock') !== null ? 'unlock' : '']))}))""")
    # The waypoint is drawn where traffic passes it, with a lock on the hop into it and the hop out of it.
    to_details = next(lk for lk in links if lk["target"] == f"workload:{NS}/details-v1"
                      and lk["source"] == "service:details.bookinfo.svc.cluster.local")
    assert to_details["via"] == f"waypoint:{NS}/waypoint" and to_details["mtls"] == "true"
    assert to_details["hops"] == {"in": "lock", "out": "lock"}
    from_legacy = next(lk for lk in links if lk["source"] == "workload:legacy/sleep")
    assert from_legacy["target"] == f"workload:{NS}/ratings-v1" and from_legacy["via"] == ""
    assert from_legacy["mtls"] == "false" and from_legacy["hops"] == {"out": "unlock"}
    assert browser.js("document.querySelectorAll('#banners .banner').length") == 0
    assert browser.js("document.querySelectorAll('g.via.waypoint').length") >= 3  # one per service it routes
    browser.screenshot(images / "dashboard-graph.png")


def test_a_trace_through_the_waypoint_is_a_waterfall(mesh: DashMesh, browser: Browser, images: Path) -> None:
    with fresh_tunnels_to_ratings(mesh):  # (the agents' tunnel spans join the trace of the request opening it)
        request_id = productpage(mesh, calls=1)

    def trace() -> dict[str, Any] | None:
        """the dashboard received the waypoint's spans of the request's calls and the agents' tunnel spans"""
        for t in mesh.api("/api/traces?service=ratings&limit=50")["traces"]:
            spans = t["spans"]
            if any(s["attributes"].get("guid:x-request-id") == request_id for s in spans) and \
                    {"productpage", "reviews", "ratings"} <= set(t["services"]) and len(t["proxies"]) >= 3:
                return t
        return None

    found: dict[str, Any] = eventually(trace, timeout=30, interval=0.5)  # type: ignore[assignment]
    wp = f"waypoint {NS}/waypoint"
    by_service = {s["service"]: s for s in found["spans"] if s["proxy"] == wp}
    assert by_service["reviews"]["parent_id"] == by_service["productpage"]["span_id"]
    assert by_service["ratings"]["parent_id"] == by_service["reviews"]["span_id"]
    assert by_service["ratings"]["depth"] > by_service["reviews"]["depth"] > by_service["productpage"]["depth"]
    assert {"nodeagent node-1", "nodeagent node-2"} <= set(found["proxies"])
    for s in found["spans"]:
        assert s["duration"] >= 0 and s["status"] in ("ok", "error") and s["start"] > 0

    browser.open(mesh.url + "#/traces?service=ratings")
    browser.wait(f"document.querySelector('tr.trace[data-trace-id=\"{found['trace_id']}\"]') !== null")
    browser.js(f"document.querySelector('tr.trace[data-trace-id=\"{found['trace_id']}\"]').click()")
    browser.wait("document.querySelectorAll('#waterfall .row.span').length > 0")
    rows = browser.js("[...document.querySelectorAll('#waterfall .row.span')].map(r => ({...r.dataset}))")
    assert len({r["proxy"] for r in rows}) >= 3
    services = [r["service"] for r in rows if r["proxy"] == wp]
    assert services.index("productpage") < services.index("reviews") < services.index("ratings")
    browser.screenshot(images / "dashboard-trace.png")


def test_workload_and_health_views(mesh: DashMesh, browser: Browser, images: Path) -> None:
    browser.open(mesh.url + f"#/workload/{NS}/reviews-v2")
    browser.wait("document.querySelector('#identity') !== null && document.querySelectorAll('.chart svg').length > 0")
    assert browser.js("document.querySelector('#identity').textContent") == \
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    browser.screenshot(images / "dashboard-workload.png")

    browser.open(mesh.url + "#/health")
    browser.wait("document.querySelectorAll('tr.component').length > 0 && document.querySelectorAll('tr.certificate').length > 0")
    components = browser.js("[...document.querySelectorAll('tr.component')].map(r => ({...r.dataset}))")
    kinds = {(c["kind"], c["name"]): c["config"] for c in components}
    assert kinds[("nodeagent", "nodeagent node-1")] == "SYNCED" and kinds[("waypoint", "waypoint")] in ("SYNCED", "STALE")
    assert ("controlplane", "istiod") in kinds
    identities = browser.js("[...document.querySelectorAll('tr.certificate')].map(r => r.dataset.identity)")
    assert "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews" in identities
    health = mesh.api("/api/health")["health"]
    assert health["control_plane"]["version"] and all(c["running"] for c in health["components"])
    browser.screenshot(images / "dashboard-health.png")


def test_an_unreachable_prometheus_is_a_banner(mesh: DashMesh, meshctl: Meshctl, browser: Browser) -> None:
    """A second dashboard pointed at a Prometheus that is not there: the page loads, says so, and the log warns."""
    proc = meshctl.popen("dashboard", "--cluster", NAME, "--port", "0", "--prometheus", "http://127.0.0.1:9",
                         "--otlp-listen", "none")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(": ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        browser.open(url + f"#/graph?namespace={NS}")
        browser.wait("document.querySelector('#banners .banner[data-source=\"prometheus\"]') !== null")
        text = browser.js("document.querySelector('#banners .banner[data-source=\"prometheus\"]').textContent")
        assert "unreachable" in text and "127.0.0.1:9" in text
        assert browser.js("document.querySelector('#graph') !== null")  # the page, not an error page
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "WARNING meshctl.dashboard: prometheus: Prometheus at http://127.0.0.1:9 is unreachable" in out
    # The first dashboard (the cluster's) still answers; the detached one is stopped with the cluster.
    assert mesh.api("/api/config")["cluster"] == NAME
