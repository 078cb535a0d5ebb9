"""The primary's merge of its workers' metrics (`waypoint.merge`), the `--workers` option, the default
worker count, and what the primary makes of its workers' channel lines and admin answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from waypoint import merge
from waypoint.main import parse_args
from waypoint.options import cpu_quota, usable_cpus
from waypoint.workers import Worker, worker_argv


def exposition(requests: int, tunnels: int, version: int, connected: int, expiry: float) -> str:
    registry = CollectorRegistry()
    c = Counter("istio_requests_total", "Requests", ["response_code"], registry=registry)
    c.labels("200").inc(requests)
    c.labels("503").inc(1)
    h = Histogram("istio_request_duration_milliseconds", "Duration", ["response_code"], buckets=(1, 10),
                  registry=registry)
    for _ in range(requests):
        h.labels("200").observe(5)
    Gauge("waypoint_tunnels", "Open tunnels", registry=registry).set(tunnels)
    Gauge("waypoint_config_version", "Version", registry=registry).set(version)
    Gauge("waypoint_xds_connected", "Connected", registry=registry).set(connected)
    Gauge("waypoint_certificate_expiry_seconds", "Expiry", registry=registry).set(expiry)
    return generate_latest(registry).decode()


def values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_counters_and_histograms_are_summed_gauges_by_their_meaning() -> None:
    a = exposition(requests=3, tunnels=2, version=7, connected=1, expiry=2000.0)
    b = exposition(requests=5, tunnels=1, version=6, connected=0, expiry=1000.0)
    merged = merge.merge([("0", merge.parse("worker 0", a)), ("1", merge.parse("worker 1", b))])
    assert merged.errors == [] and merged.merged == ["0", "1"]
    got = values(merged.text())
    assert got[("istio_requests_total", (("response_code", "200"),))] == 8
    assert got[("istio_requests_total", (("response_code", "503"),))] == 2
    assert got[("istio_request_duration_milliseconds_bucket", (("le", "10.0"), ("response_code", "200")))] == 8
    assert got[("istio_request_duration_milliseconds_bucket", (("le", "1.0"), ("response_code", "200")))] == 0
    assert got[("istio_request_duration_milliseconds_count", (("response_code", "200"),))] == 8
    assert got[("istio_request_duration_milliseconds_sum", (("response_code", "200"),))] == 40
    assert got[("waypoint_tunnels", ())] == 3  # open now in the whole waypoint
    assert got[("waypoint_config_version", ())] == 6  # the worker furthest behind
    assert got[("waypoint_xds_connected", ())] == 0  # connected only when every worker is
    assert got[("waypoint_certificate_expiry_seconds", ())] == 1000.0  # the first to expire
    created = [v for (name, _), v in got.items() if name == "istio_requests_created"]
    assert created and all(v < 1e11 for v in created)  # a time, not a sum of times
    # the same names and types as one worker's own exposition
    assert [(f.name, f.type) for f in text_string_to_metric_families(merged.text().decode())] == \
        [(f.name, f.type) for f in text_string_to_metric_families(a)]


@pytest.mark.parametrize("garbage", ["this is not prometheus text", 'istio_requests_total{code="200" 3',
                                     "istio_requests_total abc", "\x00\x01\x02"])
def test_a_worker_with_garbage_is_named_and_left_out_whole(garbage: str) -> None:
    with pytest.raises(merge.MergeError, match="metrics of worker 1 cannot be read: "):
        merge.parse("worker 1", garbage)
    good = exposition(requests=3, tunnels=2, version=7, connected=1, expiry=2000.0)
    half_good = good + garbage  # a worker whose text goes wrong half way contributes nothing at all
    with pytest.raises(merge.MergeError):
        merge.parse("worker 1", half_good)
    merged = merge.merge([("0", merge.parse("worker 0", good))])
    assert values(merged.text())[("istio_requests_total", (("response_code", "200"),))] == 3


def test_a_family_of_another_type_is_left_out_with_an_error() -> None:
    a = "# TYPE waypoint_tunnels gauge\nwaypoint_tunnels 2\n"
    b = "# TYPE waypoint_tunnels counter\nwaypoint_tunnels_total 5\n"
    merged = merge.merge([("0", merge.parse("worker 0", a)), ("1", merge.parse("worker 1", b))])
    assert merged.errors == ["metrics of 1: waypoint_tunnels is a counter, elsewhere a gauge: left out"]
    assert values(merged.text())[("waypoint_tunnels", ())] == 2  # the gauge, not added to a counter


def test_per_worker_families() -> None:
    families = merge.parse("worker 0", exposition(requests=3, tunnels=0, version=1, connected=1, expiry=1.0))
    assert merge.total(families, "istio_requests_total") == 4
    family = merge.per_source("waypoint_worker_requests", "Requests", "counter", "worker", {"0": 4.0, "1": 2.0})
    text = merge.Merged().text([family])
    assert values(text) == {("waypoint_worker_requests_total", (("worker", "0"),)): 4.0,
                            ("waypoint_worker_requests_total", (("worker", "1"),)): 2.0}


# ---- options ---------------------------------------------------------------------------------------------


@pytest.fixture
def base_args(tmp_path: Path) -> list[str]:
    (tmp_path / "root.pem").write_text("x")
    (tmp_path / "token").write_text("t")
    return ["--name", "waypoint", "--namespace", "bookinfo", "--node", "node-1", "--control-plane", "cp:15012",
            "--root-cert", str(tmp_path / "root.pem"), "--token-file", str(tmp_path / "token")]


@pytest.mark.parametrize("value", ["0", "-1", "9", "two", "1.5"])
def test_workers_out_of_range_is_a_usage_error(base_args: list[str], value: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args([*base_args, "--workers", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--workers" in err and (value in err), err


def test_workers_default_and_explicit(base_args: list[str]) -> None:
    assert parse_args([*base_args, "--workers", "1"]).workers == 1
    assert parse_args([*base_args, "--workers", "4"]).workers == 4
    default = parse_args(base_args).workers
    assert 1 <= default <= 2 and default == min(usable_cpus(), 2)


def test_worker_index_is_only_the_primarys_to_give(base_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([*base_args, "--worker-index", "1"])
    assert "--worker-index is set by the waypoint" in capsys.readouterr().err
    opts = parse_args([*base_args, "--workers", "2", "--worker-index", "1", "--worker-channel", "5"])
    assert (opts.worker_index, opts.worker_channel) == (1, 5)


def test_cpu_quota() -> None:
    assert cpu_quota("max 100000\n") is None
    assert cpu_quota("200000 100000") == 2
    assert cpu_quota("150000 100000") == 2  # a partial core is a core a worker can use
    assert cpu_quota("50000 100000") == 1
    assert cpu_quota("garbage") is None and cpu_quota("0 100000") is None


def test_usable_cpus_follows_the_cgroup_limit(tmp_path: Path) -> None:
    own = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), "/")
    where = tmp_path / path.lstrip("/")
    where.mkdir(parents=True, exist_ok=True)
    (where / "cpu.max").write_text("100000 100000\n")
    assert usable_cpus(tmp_path) == 1
    (where / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) >= 1


def test_worker_argv_makes_its_endpoints_private_and_keeps_the_port() -> None:
    argv = worker_argv(["--name", "w", "--listen", "0.0.0.0:0", "--metrics-listen", "0.0.0.0:15020"], 3, 9,
                       "0.0.0.0:15008")
    assert argv[1:3] == ["-m", "waypoint.main"]
    tail = argv[3:]
    last = {flag: tail[len(tail) - 1 - tail[::-1].index(flag) + 1]
            for flag in ("--listen", "--metrics-listen", "--worker-index", "--worker-channel")}
    assert last == {"--listen": "0.0.0.0:15008", "--metrics-listen": "127.0.0.1:0", "--worker-index": "3",
                    "--worker-channel": "9"}


def test_channel_lines(caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(1)
    worker.heard(json.dumps({"ports": {"metrics": 4000, "hbone": 15008}}).encode())
    worker.heard(b'{"ready": false, "reason": "waiting for discovery"}')
    assert worker.ports == {"metrics": 4000, "hbone": 15008} and not worker.ready
    assert worker.reason == "waiting for discovery"
    worker.heard(b'{"ready": true, "reason": ""}')
    assert worker.ready
    for bad in (b"not json", b"[1, 2]", b'{"ports": 3}'):
        worker.heard(bad)
    assert worker.ready and worker.ports == {"metrics": 4000, "hbone": 15008}  # bad lines change nothing
    assert caplog.text.count("sent a line that is not a report") == 3

