"""Observability for real: bookinfo in the mesh with a waypoint, the cluster's own Prometheus (Debian's) scraping
every component every second, and an OTLP/HTTP receiver on the underlay gateway that the node agents and the
waypoint export spans to.

- Prometheus scrapes the control plane, both node agents and the waypoint (a target added when the waypoint
  came, by the reload hook);
- exactly N requests through the waypoint are exactly N more `istio_requests_total{reporter="waypoint"}`, with
  Istio's labels and Istio's histogram buckets, and the recording rules' series appear;
- with 100% sampling set by a `Telemetry` resource, one request to productpage is one trace crossing
  productpage -> reviews -> ratings through the waypoint, with spans from at least three proxies.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.istiometrics import DURATION_BUCKETS
from mesh.serve import client
from mesh.tracing.otlp import ReceivedSpan
from mesh.tracing.receiver import OtlpReceiver, TraceStore
from tests.integration.conftest import Meshctl, cluster_file, leftovers
from tests.integration.test_mesh import eventually
from tests.integration.test_waypoint import CLIENT, NS, SLEEP_PRINCIPAL, WaypointMesh

NAME = "t-obs"
GATEWAY = "172.30.0.1"
OTLP_PORT = 4318
DETAILS = f"details.{NS}.svc.cluster.local"


class ObservedMesh(WaypointMesh):
    store: TraceStore

    @property
    def prometheus(self) -> client.Endpoint:
        return client.Endpoint.tcp(GATEWAY, 9090, netns=f"amb.{self.name}.underlay")

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = client.get(self.prometheus, "/api/v1/query?query=" + urllib.parse.quote(expr), timeout=5)
        answer = reply.json()
        assert reply.status == 200 and answer["status"] == "success", reply.text
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        """The sum of an instant query's values (0 when it has no series)."""
        return sum(float(r["value"][1]) for r in self.query(expr))


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[ObservedMesh]:
    tools = pod_files("obs-tools")  # the sleep pod runs client.py as its own user
    (tools / "client.py").write_text(CLIENT)
    path = cluster_file(tmp_path_factory.mktemp("obs"), NAME)
    m = ObservedMesh(NAME, meshctl)
    m.tools = tools
    m.store = TraceStore()
    receiver: OtlpReceiver | None = None
    try:
        meshctl("cluster", "up", "-f", str(path), "--scrape-interval", "1",
                "--otlp-endpoint", f"http://{GATEWAY}:{OTLP_PORT}/v1/traces")
        # The collector the cluster was pointed at: on the underlay's gateway, which every node and pod reaches.
        receiver = OtlpReceiver(m.store.add, GATEWAY, OTLP_PORT, netns=f"amb.{NAME}.underlay")
        receiver.start()
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")
        eventually(m.waypoint_ready, timeout=60)

        def services_known() -> bool:
            return "reviews.bookinfo.svc.cluster.local" in m.waypoint_config().get("services", [])

        eventually(services_known, timeout=30)

        def through_waypoint() -> bool:
            """bookinfo's service traffic reaches the waypoint"""
            return m.load("reviews", "/reviews/0")["status"].get("200") == 1 and any(
                e["authority"] == "reviews:9080" for e in m.waypoint_access_log())

        eventually(through_waypoint, timeout=60, interval=1.0)
        yield m
    finally:
        if receiver is not None:
            receiver.stop()
        if (m.dir / "logs").is_dir():  # kept for a look after a failure; the cluster's directory goes with it
            shutil.copytree(m.dir / "logs", tmp_path_factory.mktemp("obs-logs"), dirs_exist_ok=True)
        meshctl("cluster", "down", NAME, check=False)
        assert leftovers(NAME) == []


def test_prometheus_scrapes_every_component(mesh: ObservedMesh) -> None:
    def all_up() -> bool:
        """Prometheus scrapes the control plane, both node agents and the waypoint"""
        up = {(r["metric"]["job"], r["metric"].get("pod") or r["metric"].get("node", "")): r["value"][1]
              for r in mesh.query("up")}
        return up == {("controlplane", ""): "1", ("nodeagent", "node-1"): "1", ("nodeagent", "node-2"): "1",
                      ("waypoint", "waypoint"): "1"}

    eventually(all_up, timeout=30, interval=1.0)
    status = mesh.meshctl("cluster", "status", NAME).stdout
    assert f"prometheus: http://{GATEWAY}:9090 in network namespace amb.{NAME}.underlay (Running)" in status
    record = mesh.status()
    assert record["prometheus"]["running"] and record["observability"]["prometheus"]["scrapeInterval"] == 1.0
    # The cluster's name is an external label (for federation and remote write), the data in the cluster's dir.
    assert f"cluster: {NAME}" in (mesh.dir / "prometheus" / "prometheus.yml").read_text()
    assert any((mesh.dir / "prometheus" / "data").iterdir())


def test_exactly_n_requests_are_counted_with_istios_labels_and_buckets(mesh: ObservedMesh) -> None:
    series = f'istio_requests_total{{reporter="waypoint",source_workload="sleep",destination_service="{DETAILS}"}}'
    before = mesh.value(series)
    time.sleep(2.5)  # two more scrapes: nothing else sends sleep -> details
    assert mesh.value(series) == before
    n = 37
    answer = mesh.load("details", "/details/0", n=n)
    assert answer["status"] == {"200": n}, answer

    def counted() -> bool:
        """Prometheus has all N requests"""
        return mesh.value(series) == before + n

    eventually(counted, timeout=20, interval=0.5)
    time.sleep(2.5)
    assert mesh.value(series) == before + n  # settled: not one more

    (labels,) = [r["metric"] for r in mesh.query(series)]
    expected = {
        "job": "waypoint", "namespace": NS, "pod": "waypoint", "reporter": "waypoint",
        "source_workload": "sleep", "source_workload_namespace": NS, "source_principal": f"spiffe://{SLEEP_PRINCIPAL}",
        "source_app": "sleep", "source_canonical_service": "sleep",
        "destination_workload": "details-v1", "destination_workload_namespace": NS,
        "destination_principal": f"spiffe://cluster.local/ns/{NS}/sa/bookinfo-details",
        "destination_app": "details", "destination_version": "v1", "destination_canonical_service": "details",
        "destination_canonical_revision": "v1", "destination_service": DETAILS, "destination_service_name": "details",
        "destination_service_namespace": NS, "destination_cluster": "Kubernetes", "request_protocol": "http",
        "response_code": "200", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }
    assert {k: labels.get(k) for k in expected} == expected, labels
    assert "source_version" in labels and "source_cluster" in labels

    buckets = mesh.query(series.replace("istio_requests_total", "istio_request_duration_milliseconds_bucket"))
    assert {float(r["metric"]["le"]) for r in buckets} == {*map(float, DURATION_BUCKETS), math.inf}
    assert max(float(r["value"][1]) for r in buckets) == before + n  # le="+Inf" counts every request
    for name in ("istio_request_bytes_count", "istio_response_bytes_count"):
        assert mesh.value(series.replace("istio_requests_total", name)) == before + n

    # A rate needs an increase between two scrapes of a series. When the N requests all fit between two
    # scrapes, the series' first sample already holds N and shows none; a second load makes one.
    assert mesh.load("details", "/details/0", n=5)["status"] == {"200": 5}
    edge = f'source_workload="sleep",destination_service="{DETAILS}",reporter="waypoint"'

    def recorded() -> bool:
        """the recording rules' series of the sleep -> details edge exist"""
        return all(mesh.query(f"{rule}{{{edge}}}") for rule in (
            "workload_edge:istio_requests:rate1m", "workload_edge:istio_requests_errors:rate1m",
            "workload_edge:istio_requests_errors:ratio1m", "workload_edge:istio_request_duration_milliseconds:p99_1m"))

    eventually(recorded, timeout=30, interval=1.0)
    # The rule is evaluated after the scrapes that saw the second load: the rate may be 0 at first.
    eventually(lambda: mesh.value(f"workload_edge:istio_requests:rate1m{{{edge}}}") > 0, timeout=30, interval=1.0)
    assert mesh.value(f"workload_edge:istio_requests_errors:ratio1m{{{edge}}}") == 0
    # TCP: the node agents report the tunnels (source and destination) and the recording rules sum them.
    eventually(lambda: mesh.value('workload_edge:istio_tcp_sent_bytes:rate1m{reporter="destination",'
                                  'destination_workload="details-v1"}') > 0, timeout=30, interval=1.0)
    assert mesh.query('istio_tcp_connections_opened_total{reporter="source",source_workload="sleep"}')


REVIEWS_TO_V3 = [
    {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews-traced", "namespace": NS},
     "spec": {"host": "reviews", "subsets": [{"name": "v3", "labels": {"version": "v3"}}]}},
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews-traced", "namespace": NS},
     "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v3"}}]}]}},
    # (a DestinationRule of their own: the waypoint retires its pooled connections to these services)
    *({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": f"{host}-traced", "namespace": NS},
       "spec": {"host": host, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}} for host in ("productpage", "ratings")),
]


@contextlib.contextmanager
def fresh_tunnels_to_ratings(mesh: WaypointMesh) -> Iterator[None]:
    """Within: reviews answers from v3 (which calls ratings), and the waypoint has that route table.  A
    new DestinationRule for a service retires the waypoint's pooled upstream connections to it (as Envoy
    drains a changed cluster's pools), so with one for productpage, reviews and ratings the next request
    opens a tunnel at each of its hops, and each destination agent's tunnel span joins that request's
    trace (a tunnel's span belongs to the request that opened it; later requests reuse the tunnel)."""
    text = mesh.apply_yaml(REVIEWS_TO_V3)

    def applied() -> bool:
        config = mesh.waypoint_config()
        return config.get("virtual_services", {}).get(f"reviews.{NS}.svc.cluster.local") == f"{NS}/reviews-traced" \
            and {f"{h}.{NS}.svc.cluster.local" for h in ("productpage", "ratings")} <= set(config.get("destination_rules", ()))

    try:
        eventually(applied, timeout=20, interval=0.3)
        yield
    finally:
        mesh.delete(text, mesh.tools)
        eventually(lambda: mesh.waypoint_config().get("virtual_services", {}).get(
            f"reviews.{NS}.svc.cluster.local") != f"{NS}/reviews-traced", timeout=20, interval=0.3)


def _of(spans: list[ReceivedSpan], service: str, prefix: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.name.startswith(prefix)]


def test_a_trace_crosses_productpage_reviews_and_ratings(mesh: ObservedMesh) -> None:
    mesh.apply_yaml([{"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
                      "metadata": {"name": "mesh-default", "namespace": "istio-system"},
                      "spec": {"tracing": [{"randomSamplingPercentage": 100.0}]}}])
    eventually(lambda: mesh.waypoint_config().get("tracing", {}).get("sampling") == 100.0, timeout=20)

    # No trace headers from the client: the waypoint starts the trace, sampled by the Telemetry's 100%.
    with fresh_tunnels_to_ratings(mesh):
        request_id = str(uuid.uuid4())
        out = mesh.curl(NS, "sleep", "http://productpage:9080/productpage", "-H", f"x-request-id: {request_id}")
    answer = json.loads(out.stdout)
    assert answer["reviews"]["ratings"]["service"] == "ratings"

    def trace() -> list[ReceivedSpan]:
        for summary in mesh.store.traces():
            spans = mesh.store.trace(summary.trace_id)
            if any(s.attributes.get("guid:x-request-id") == request_id for s in spans):
                return spans
        return []

    def complete() -> list[ReceivedSpan]:
        """the trace has the waypoint's spans of all four requests and the agents' tunnel spans"""
        spans = trace()
        waypoint = [s for s in spans if s.service == f"waypoint.{NS}"]
        agents = [s for s in spans if s.service == "nodeagent"]
        return spans if len(waypoint) >= 4 and len(agents) >= 3 else []

    spans: list[ReceivedSpan] = eventually(complete, timeout=30, interval=0.5)  # type: ignore[assignment]
    wp = f"waypoint.{NS}"
    (page,) = _of(spans, wp, f"productpage.{NS}.svc.cluster.local:9080")
    (reviews,) = _of(spans, wp, f"reviews.{NS}.svc.cluster.local:9080")
    (ratings,) = _of(spans, wp, f"ratings.{NS}.svc.cluster.local:9080")
    (details,) = _of(spans, wp, f"details.{NS}.svc.cluster.local:9080")
    # A root started by the waypoint; each next call a child of the waypoint's span of the call that made it
    # (the application passed the headers on).
    assert page.parent_span_id == "" and page.attributes["http.status_code"] == 200
    assert reviews.parent_span_id == page.span_id and details.parent_span_id == page.span_id
    assert ratings.parent_span_id == reviews.span_id
    assert page.attributes["guid:x-request-id"] == request_id == ratings.attributes["guid:x-request-id"]
    # The destination agents' tunnel spans are children of the waypoint span whose request opened the tunnel.
    tunnels = [s for s in spans if s.service == "nodeagent" and s.name.startswith("inbound tunnel")]
    assert {t.parent_span_id for t in tunnels} >= {page.span_id, ratings.span_id}
    proxies = {(s.service, s.resource.get("service.instance.id")) for s in spans}
    assert len(proxies) >= 3, proxies
    assert {("nodeagent", "node-1"), ("nodeagent", "node-2")} <= proxies
    # The exporters counted nothing dropped.
    metrics = mesh.waypoint_metrics()
    assert 'mesh_trace_spans_dropped_total{reason="queue_full"} 0.0' in metrics
    assert "mesh_trace_spans_exported_total" in metrics
    print(f"trace {page.trace_id}: {len(spans)} spans from {sorted(proxies)}", file=sys.stderr)
