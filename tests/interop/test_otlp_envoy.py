"""Our OTLP/HTTP receiver takes spans from a real OTLP sender: Envoy's OpenTelemetry tracer.

Envoy (an HTTP listener answering directly, tracing every request) exports its spans with the
`envoy.tracers.opentelemetry` tracer's `http_service` exporter to `mesh.tracing.receiver.OtlpReceiver` on
loopback.  One request through Envoy, carrying a W3C `traceparent` of ours, becomes one span in our
`TraceStore`: Envoy's service name, a child of our context in our trace, Envoy's HTTP attributes.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from envoy_helpers import addr, free_port, run_envoy, static_cluster

from mesh.tracing.otlp import ReceivedSpan
from mesh.tracing.receiver import OtlpReceiver, TraceStore

SERVICE = "envoy-interop"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def envoy_config(listen: int, otlp_port: int) -> dict[str, Any]:
    tracer = {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "service_name": SERVICE,
            "http_service": {
                "http_uri": {"uri": f"http://127.0.0.1:{otlp_port}/v1/traces", "cluster": "otlp", "timeout": "2s"},
            },
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "tracing": {"provider": tracer, "random_sampling": {"value": 100}},
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "hi"}}}],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        # Send each span at once rather than on Envoy's 5 s timer.
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.opentelemetry.min_flush_spans": 1, "tracing.opentelemetry.flush_interval_ms": 100}}]},
        "static_resources": {
            "listeners": [{"name": "http", "address": addr(listen), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}],
            "clusters": [static_cluster("otlp", otlp_port)],
        },
    }


def test_envoys_opentelemetry_spans_land_in_our_trace_store(envoy_bin: str, tmp_path: Path) -> None:
    store = TraceStore()
    with OtlpReceiver(store.add, "127.0.0.1", 0) as receiver:
        listen = free_port()
        with run_envoy(envoy_bin, envoy_config(listen, receiver.port), tmp_path / "envoy") as envoy:
            request = urllib.request.Request(f"http://127.0.0.1:{listen}/productpage?u=1",
                                             headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
            with urllib.request.urlopen(request, timeout=5) as reply:
                assert reply.status == 200 and reply.read() == b"hi"
            deadline = time.monotonic() + 15
            while not store.trace(TRACE):
                assert time.monotonic() < deadline, f"no span from Envoy arrived:\n{envoy.log()}"
                time.sleep(0.1)
    (span,) = store.trace(TRACE)
    assert isinstance(span, ReceivedSpan)
    assert span.service == SERVICE and span.trace_id == TRACE and span.parent_span_id == PARENT
    assert len(span.span_id) == 16 and span.span_id != PARENT and span.end_ns >= span.start_ns > 0
    assert span.kind == 2  # SERVER: Envoy's span of the request it received
    assert span.attributes.get("http.method") == "GET" and span.attributes.get("http.status_code") == "200"
    assert "/productpage" in str(span.attributes.get("http.url"))
    assert store.received == 1
