"""Pure parts of the harness: wrk parsing, Prometheus counters, path checks, capture rules, Envoy
configuration, settings and the time-left estimate."""

from __future__ import annotations

from pathlib import Path

from bench.harness import Progress, Settings, parse_wrk
from bench.modes import moved, prometheus_counters
from bench.sidecar import Route, capture_rules, client_config, server_config
from mesh.identity import SpiffeId

WRK = """Running 5s test @ http://10.97.0.10:80/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    21.43us   43.83us   1.59ms   98.61%
  Latency Distribution
     50%   15.00us
     75%   16.00us
     90%   30.00us
     99%    1.19ms
  167716 requests in 3.10s, 176.74MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  54105.81
Transfer/sec:     57.02MB
"""


def test_parse_wrk() -> None:
    r = parse_wrk(WRK)
    assert r["requests_per_s"] == 54105.81 and r["requests"] == 167716
    assert r["latency_us"] == {"p50": 15.0, "p75": 16.0, "p90": 30.0, "p99": 1190.0}
    assert r["errors"] == {"socket read": 2, "socket timeout": 1, "non-2xx": 4} and r["error_count"] == 7


def test_prometheus_counters_sum_label_sets() -> None:
    text = """# HELP istio_tcp_connections_opened_total x
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",a="b c"} 3.0
istio_tcp_connections_opened_total{reporter="destination"} 4.0
istio_tcp_connections_opened_created{reporter="source"} 1.7e9
process_cpu_seconds_total 12.0
"""
    assert prometheus_counters(text) == {"istio_tcp_connections_opened_total": 7.0}


def test_moved_prefers_traffic_counters_then_cpu() -> None:
    before = {"nodeagent node-1:istio_tcp_connections_opened_total": 5.0, "nodeagent node-1:cpu_seconds": 1.0}
    assert not moved(before, {**before, "nodeagent node-1:cpu_seconds": 9.0}, "nodeagent", 0.05)
    assert moved(before, {**before, "nodeagent node-1:istio_tcp_connections_opened_total": 6.0}, "nodeagent", 0.05)
    cpu_only = {"waypoint:cpu_seconds": 1.0}
    assert moved(cpu_only, {"waypoint:cpu_seconds": 1.2}, "waypoint", 0.05)
    assert not moved(cpu_only, {"waypoint:cpu_seconds": 1.01}, "waypoint", 0.05)


def test_capture_rules_exempt_the_proxy_and_loopback() -> None:
    rules = capture_rules().splitlines()
    out = [r for r in rules if r.startswith("-A BENCH-SIDECAR-OUTBOUND")]
    assert out == ["-A BENCH-SIDECAR-OUTBOUND -m owner --uid-owner 1337 -j RETURN",
                   "-A BENCH-SIDECAR-OUTBOUND -d 127.0.0.1/32 -j RETURN",
                   "-A BENCH-SIDECAR-OUTBOUND -p tcp -j REDIRECT --to-ports 15001"]
    assert "-A BENCH-SIDECAR-INBOUND -p tcp -j REDIRECT --to-ports 15006" in rules
    assert rules[0] == "*nat" and "COMMIT" in rules


def test_envoy_configs_originate_and_require_mtls(tmp_path: Path) -> None:
    client_id, server_id = SpiffeId("cluster.local", "bench", "client"), SpiffeId("cluster.local", "bench", "server")
    routes = [Route("10.97.0.10", 80, "10.245.2.2", 8080, True), Route("10.97.0.10", 9000, "10.245.2.2", 9090, False)]
    c = client_config(tmp_path, server_id, routes)
    listener = c["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 15001
    assert [ch["filter_chain_match"]["destination_port"] for ch in listener["filter_chains"]] == [80, 9000]
    http = next(cl for cl in c["static_resources"]["clusters"] if cl["name"] == "outbound_http_80")
    tls = http["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"] == server_id.uri
    assert "http2_protocol_options" in str(http["typed_extension_protocol_options"])
    s = server_config(tmp_path, client_id, [(8080, True), (9090, False)])
    chains = s["static_resources"]["listeners"][0]["filter_chains"]
    for ch in chains:
        ctx = ch["transport_socket"]["typed_config"]
        assert ctx["require_client_certificate"] is True
        assert ctx["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["matcher"][
            "exact"] == client_id.uri
    ports = {cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] for cl in s["static_resources"]["clusters"]}
    assert ports == {8080, 9090}


def test_quick_settings_and_time_left() -> None:
    q = Settings.quick()
    assert (q.rounds, q.duration, q.stream_bytes) == (1, 5.0, 16 << 20)
    full = Settings(modes=("a", "b", "c", "d"))
    p = Progress(full, lambda _: None)
    total = p.remaining(1, 0, 0)
    # 4 modes x 3 rounds x (3 phases of 30 s + stream) + crosscheck + switch overheads: under 30 minutes
    assert 15 * 60 < total < 30 * 60
    p.skipped.add("c")
    assert p.remaining(1, 0, 0) < total
    assert p.remaining(3, 3, len(full.phases("d")) - 1) <= full.phase_seconds(full.phases("d")[-1])
