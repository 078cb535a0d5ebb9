"""The new-connection and scale phases' client sides against a real local server, the L4 floor's
Envoy configuration and path check, the settings and options that select the phases, and the waypoint
mode c applies (its `--workers` and `--engine`)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import newconn_bench, scale
from bench.harness import Settings, fresh_rss, newconn_phase, newconn_rate
from bench.modes import MODES, Context, L4Floor, MeshL7, PathError
from bench.netio import Proc
from bench.ports import free_port as _free_port
from bench.sidecar import Route, SidecarPair, SidecarPod
from mesh.errors import UsageError
from mesh.identity import SpiffeId
from meshctl.bench import settings_from
from meshctl.main import build_parser

ROOT = Path(__file__).resolve().parents[3]


MORE_PORTS: list[int] = []


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, int]]:
    """bench/server.py on loopback: (HTTP port, its pid); it also serves HTTP on `MORE_PORTS`."""
    port = _free_port()
    MORE_PORTS[:] = [_free_port(), _free_port()]
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "server.py"), "--http-port", str(port),
                             "--more-http-ports", ",".join(map(str, MORE_PORTS)), "--sink-port", str(_free_port())])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield port, proc.pid
    proc.kill()
    proc.wait()


def test_new_connections_at_a_fixed_rate_each_carry_one_request(server: tuple[int, int]) -> None:
    port, _ = server
    res = newconn_bench.run(("127.0.0.1", port), 200.0, 0.5, newconn_bench.request_bytes("127.0.0.1", port))
    out: dict[str, Any] = res.to_json()
    assert out["completed"] == 100 and out["sent"] == 100 and out["error_count"] == 0
    assert out["latency_us"]["count"] == 100 and out["connect_us"]["count"] == 100
    assert out["latency_us"]["p50"] >= out["connect_us"]["p50"] > 0


def test_refused_and_unanswered_connections_are_counted_as_errors() -> None:
    closed = _free_port()
    res = newconn_bench.run(("127.0.0.1", closed), 100.0, 0.1, b"GET / HTTP/1.1\r\n\r\n")
    assert res.completed == 0 and res.errors == {"connect: ECONNREFUSED": 10}
    first = newconn_bench.first(("127.0.0.1", closed), b"GET / HTTP/1.1\r\n\r\n", 0.3)
    assert first.completed == 0 and "connect: ECONNREFUSED" in first.errors
    mute = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers: closed unanswered
    try:
        port = mute.getsockname()[1]
        start = time.monotonic()
        res = newconn_bench.run(("127.0.0.1", port), 100.0, 0.05, b"GET / HTTP/1.1\r\n\r\n")
        assert res.completed == 0 and res.errors == {"timed out": 5}
        assert time.monotonic() - start < newconn_bench.DRAIN_GRACE + 2
    finally:
        mute.close()


def test_first_reports_the_first_connection_that_completes(server: tuple[int, int]) -> None:
    port, _ = server
    out: dict[str, Any] = newconn_bench.first(("127.0.0.1", port), newconn_bench.request_bytes("127.0.0.1", port),
                                              5.0).to_json()
    assert out["completed"] == 1 and out["latency_us"]["count"] == 1


def test_scale_holds_idle_tunnels_and_notices_when_they_are_closed(server: tuple[int, int]) -> None:
    port, _ = server
    targets = [("127.0.0.1", p) for p in (port, *MORE_PORTS)]
    held, report = scale.open_tunnels(targets, 51, 500.0, newconn_bench.request_bytes("x", port)
                                      .replace(b"Connection: close\r\n", b""))
    try:
        assert report["opened"] == 51 and report["error_count"] == 0 and len(held) == 51
        assert sorted(s.getpeername()[1] for s in held) == sorted([port, *MORE_PORTS] * 17)  # spread evenly
        assert scale.closed_while_held(held) == 0
        held[0].shutdown(socket.SHUT_RDWR)  # one the path "closed"
        assert scale.closed_while_held(held) == 1
    finally:
        for s in held:
            s.close()


def test_scale_measure_reads_memory_and_cpu_around_the_client(server: tuple[int, int]) -> None:
    port, pid = server

    def start(argv: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    out = scale.measure(start, [Proc("server", pid)], [f"127.0.0.1:{p}" for p in (port, *MORE_PORTS)], 200, 1000.0,
                        30.0)
    assert out["opened"] == 200 and out["error_count"] == 0, out
    assert out["completed"] == 200
    assert set(out["rss_idle_kib"]) == set(out["rss_held_kib"]) == set(out["rss_after_kib"]) == {"server"}
    assert out["rss_idle_kib"]["server"] > 0 and "server" in out["kib_per_tunnel"]
    assert out["cpu_per_1k_connections"] >= 0 and "server" in out["mesh_cpu_seconds"]
    assert 0 <= out["quiet_after_s"] <= scale.QUIET_TIMEOUT + 1


def test_fresh_memory_is_read_once_the_capture_is_in_place_and_steady(server: tuple[int, int]) -> None:
    _, pid = server

    class Capturing(L4Floor):  # its capture appears at the third look; its one process is the server
        looks = 0

        def captured(self, ctx: object) -> bool:
            self.looks += 1
            return self.looks >= 3

        def procs(self, ctx: object) -> list[Proc]:
            return [Proc("server", pid)]

    mode = Capturing()
    fresh = fresh_rss(mode, None, settle=0.01, timeout=10.0)  # type: ignore[arg-type]
    assert mode.looks == 3 and set(fresh) == {"server"} and fresh["server"] > 0


def test_scale_client_refuses_more_tunnels_than_it_may_open() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--target", "127.0.0.1:1", "--tunnels",
                          str(10 ** 8)], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert out.returncode == 1
    assert "file descriptors" in json.loads(out.stdout)["fatal"]
    bad = subprocess.run([sys.executable, "-m", "bench.scale", "--target", "nowhere"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30, check=False)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxies' files are owned by uid 1337")
def test_the_l4_floor_runs_both_envoys_as_tcp_proxies_with_mtls(tmp_path: Path) -> None:
    client_id, server_id = SpiffeId("cluster.local", "bench", "client"), SpiffeId("cluster.local", "bench", "server")
    routes = [Route("10.97.0.10", 80, "10.245.2.2", 8080, True), Route("10.97.0.10", 9000, "10.245.2.2", 9090, False)]
    pair = SidecarPair("t-perf", tmp_path, SidecarPod("client", "nowhere", client_id, server_id),
                       SidecarPod("server", "nowhere", server_id, client_id), routes)
    try:
        for l4 in (True, False):
            pair.write_files(l4=l4)
            client = json.loads((pair.home / "client" / "envoy.json").read_text())
            server = json.loads((pair.home / "server" / "envoy.json").read_text())
            text = json.dumps([client, server])
            assert ("http_connection_manager" in text) is not l4
            clusters = {c["name"]: c for c in client["static_resources"]["clusters"]}
            if l4:
                assert set(clusters) == {"passthrough", "outbound_tcp_80", "outbound_tcp_9000"}
                tls = clusters["outbound_tcp_80"]["transport_socket"]["typed_config"]["common_tls_context"]
                assert tls["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"] == \
                    server_id.uri
                for chain in server["static_resources"]["listeners"][0]["filter_chains"]:
                    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True
                    assert chain["filters"][0]["name"] == "envoy.filters.network.tcp_proxy"
    finally:
        if pair.temporary is not None:
            import shutil

            shutil.rmtree(pair.temporary, ignore_errors=True)


def test_the_l4_floor_proves_its_path_by_connections_not_requests() -> None:
    mode = MODES["f"]
    assert isinstance(mode, L4Floor)
    before = {"client:tcp.outbound_tcp_80.downstream_cx_total": 2.0, "server:tcp.inbound_8080.downstream_cx_total": 2.0,
              "client:cluster.outbound_tcp_80.upstream_rq_total": 2.0}  # tcp_proxy counts a connection so too
    after = {"client:tcp.outbound_tcp_80.downstream_cx_total": 6.0, "server:tcp.inbound_8080.downstream_cx_total": 6.0,
             "client:cluster.outbound_tcp_80.upstream_rq_total": 6.0, "server:listener.0.0.0.0_15006.ssl.handshake": 6.0,
             "client:http.admin.downstream_cx_total": 9.0}  # the stats were read through the admin's HTTP
    ctx = None
    assert "carried the probe's 4 connections" in mode.check_path(ctx, before, after, 200)  # type: ignore[arg-type]
    with pytest.raises(PathError, match="took 0"):
        mode.check_path(ctx, after, after, 200)  # type: ignore[arg-type]
    with pytest.raises(PathError, match="parsed HTTP"):
        mode.check_path(ctx, before, {**after, "client:http.outbound_http_80.downstream_rq_total": 200.0},  # type: ignore[arg-type]
                        200)
    with pytest.raises(PathError, match="no TLS handshake"):
        mode.check_path(ctx, before, {k: v for k, v in after.items() if "ssl" not in k}, 200)  # type: ignore[arg-type]


def test_phases_per_mode() -> None:
    full = Settings()
    assert full.phases("b")[-3:] == ["newconn200", "newconn1000", "scale"]
    assert "scale" not in full.phases("d") and "scale" in full.phases("e") and "newconn1000" in full.phases("f")
    assert newconn_rate(newconn_phase(1000.0)) == 1000.0 and newconn_phase(200.0) == "newconn200"
    quick = Settings.quick()
    assert [p for p in quick.phases("a") if p.startswith("newconn")] == ["newconn200"]
    assert quick.phase_seconds("newconn200") == 5.0 and full.phase_seconds("newconn200") == 10.0
    assert "scale" not in Settings.quick(scale_tunnels=0).phases("b")


def _args(*argv: str) -> argparse.Namespace:
    ns = argparse.Namespace(quick=True, modes=None, rounds=None, duration=None, rate=None, stream_mib=None,
                            newconn_rates=None, scale_tunnels=None, client_cpu=None, cluster_name=None, output=None)
    for a in argv:
        k, _, v = a.partition("=")
        setattr(ns, k, v)
    return ns


def test_options_select_the_phases_and_refuse_bad_values() -> None:
    s = settings_from(_args("modes=a,f", "newconn_rates=100,500"))
    assert isinstance(s, Settings) and s.modes == ("a", "f") and s.newconn_rates == (100.0, 500.0)
    s = settings_from(_args())
    assert isinstance(s, Settings) and s.modes == ("a", "b", "c", "d", "e", "f")
    with pytest.raises(UsageError, match="--newconn-rates 1,x"):
        settings_from(_args("newconn_rates=1,x"))
    with pytest.raises(UsageError, match="positive"):
        settings_from(_args("newconn_rates=0"))
    ns = _args()
    ns.scale_tunnels = -1
    with pytest.raises(UsageError, match="--scale-tunnels"):
        settings_from(ns)
    with pytest.raises(UsageError, match="--modes a,g"):
        settings_from(_args("modes=a,g"))


def test_mode_c_applies_the_waypoint_with_the_runs_workers_and_engine() -> None:
    """`meshctl bench --waypoint-workers N --waypoint-engine E` reaches the `meshctl waypoint apply` mode c
    runs, as flags that verb reads so; unset, the cluster's defaults (no flag); a bad engine is refused."""
    args = build_parser().parse_args(["bench", "--quick", "--waypoint-workers", "2", "--waypoint-engine", "trio"])
    s = settings_from(args)
    assert isinstance(s, Settings) and (s.waypoint_workers, s.waypoint_engine) == (2, "trio")
    mode = MODES["c"]
    assert isinstance(mode, MeshL7)
    pair = SidecarPair("t", Path("nowhere"), SidecarPod("client", "n1", SpiffeId("td", "bench", "client"),
                                                        SpiffeId("td", "bench", "server")),
                       SidecarPod("server", "n2", SpiffeId("td", "bench", "server"),
                                  SpiffeId("td", "bench", "client")), [])
    ctx = Context("t", "bench", "n1", "n2", {}, pair, waypoint_workers=s.waypoint_workers,
                  waypoint_engine=s.waypoint_engine)
    applied = build_parser().parse_args([*mode.apply_args(ctx), "--cluster", "t"])
    assert (applied.waypoint_verb, applied.namespace, applied.enroll_namespace) == ("apply", "bench", True)
    assert (applied.workers, applied.engine) == (2, "trio")
    default = settings_from(build_parser().parse_args(["bench", "--quick"]))
    assert isinstance(default, Settings) and (default.waypoint_workers, default.waypoint_engine) == (0, "")
    ctx = Context("t", "bench", "n1", "n2", {}, pair)
    applied = build_parser().parse_args([*mode.apply_args(ctx), "--cluster", "t"])
    assert (applied.workers, applied.engine) == (None, None)
    with pytest.raises(UsageError, match="--waypoint-engine epoll: give one of uvloop, trio"):
        settings_from(build_parser().parse_args(["bench", "--waypoint-engine", "epoll"]))


def test_server_refuses_bad_ports(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import server as bench_server

    with pytest.raises(SystemExit) as exc:
        bench_server.main(["--more-http-ports", "8081,x"])
    assert exc.value.code == 2 and "--more-http-ports 8081,x" in capsys.readouterr().err


def test_last_prewarm_event_of_a_pod(tmp_path: Path) -> None:
    from bench.modes import last_prewarm

    log = tmp_path / "nodeagent.node-1.log"
    assert last_prewarm(log, "bench/client") is None  # no log (yet)
    log.write_text(
        '2026-11-30 07:09:48,843 INFO nodeagent.proxy {"event": "prewarmed", "pod": "bench/client", "dialled": 0, '
        '"unreachable": 1}\n'
        '{"time":"2026-11-30T07:10:40.159Z","direction":"outbound","result":"200"}\n'
        '2026-11-30 07:10:12,689 INFO nodeagent.proxy {"event": "prewarmed", "pod": "bench/server", "dialled": 3, '
        '"unreachable": 0}\n'
        '2026-11-30 07:10:33,415 INFO nodeagent.proxy {"event": "prewarmed", "pod": "bench/client", "dialled": 1, '
        '"unreachable": 0}\n')
    assert last_prewarm(log, "bench/client") == {"event": "prewarmed", "pod": "bench/client", "dialled": 1,
                                                 "unreachable": 0}
    assert last_prewarm(log, "other/pod") is None


def test_prewarm_events_of_a_pod_in_order(tmp_path: Path) -> None:
    """What the first connection waits for: a pre-warm reported after the mode was entered (the count of
    the pod's events grows), not one left in the log by an earlier round."""
    from bench.modes import prewarms

    log = tmp_path / "nodeagent.node-1.log"
    assert prewarms(log, "bench/client") == []
    log.write_text('{"event": "prewarmed", "pod": "bench/client", "dialled": 0}\n'
                   'INFO nodeagent.proxy {"event": "prewarmed", "pod": "bench/client", broken\n'
                   'INFO nodeagent.proxy {"event": "prewarmed", "pod": "bench/client", "dialled": 1}\n')
    assert [e["dialled"] for e in prewarms(log, "bench/client")] == [0, 1]  # the broken line is skipped
