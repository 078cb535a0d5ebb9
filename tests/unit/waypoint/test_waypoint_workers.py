"""`python -m waypoint.main --workers 2` as real processes against a real control plane on 127.0.0.1: both
workers take HBONE connections on the one port, the primary's metrics are the workers' summed, readiness
waits for every worker, a log level reaches every worker, a killed worker is started again and requests keep
succeeding, SIGTERM drains both with no request in flight failing, and a worker outlives no primary."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_waypoint_process import CONFIG, _get, _request, control_plane_for_waypoint, free_port
from waypoint_harness import start_backend
from waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID

from mesh.api.client import ApiClient
from mesh.api.validate import Document
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.secrets.svid import accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context

pytestmark = pytest.mark.timeout(150)
ROOT = Path(__file__).resolve().parents[3]
VIP = "10.96.0.11:9080"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(check):
            await trio.sleep(0.05)


async def one_request(pool: HbonePool, key: PoolKey, path: str = "/reviews/0") -> int:
    status, _body = await _request(pool, key, VIP, path=path)
    return status


def test_two_workers_share_the_port_and_are_one_waypoint(tmp_path: Path) -> None:
    cp, running, token = control_plane_for_waypoint(tmp_path)
    home = tmp_path / "controlplane"
    authority = running.extras["authority"]
    ports = {k: free_port() for k in ("metrics", "ready", "admin")}
    logfile = tmp_path / "waypoint.log"
    out = logfile.open("w")
    proc: subprocess.Popen[str] | None = None
    pids: list[int] = []
    sent = [0]  # requests answered 200
    base = "http://127.0.0.1:{}".format

    def workers() -> list[dict]:  # type: ignore[type-arg]
        code, body = _get(base(ports["admin"]) + "/workers")
        return json.loads(body)["workers"] if code == 200 else []

    def metrics() -> str:
        code, body = _get(base(ports["metrics"]) + "/metrics")
        assert code == 200, body
        return body

    async def main() -> None:
        nonlocal proc
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "reviews-v1")
            docs = [Document("test", i, b) for i, b in enumerate(yaml.safe_load_all(CONFIG.format(port=backend.port)), 1)]
            ApiClient(home / "api.sock", timeout=10).apply(docs)
            proc = subprocess.Popen(
                [sys.executable, "-m", "waypoint.main", "--name", "waypoint", "--namespace", "bookinfo",
                 "--node", "node-1", "--control-plane", f"127.0.0.1:{running.grpc_port}",
                 "--root-cert", str(home / "ca" / "root-cert.pem"), "--token-file", str(token),
                 "--trust-domain", "cluster.local", "--cert-ttl", "600", "--workers", "2", "--drain-seconds", "3",
                 "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{ports['metrics']}",
                 "--ready-listen", f"127.0.0.1:{ports['ready']}", "--admin-listen", f"127.0.0.1:{ports['admin']}"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
            ready = base(ports["ready"]) + "/healthz/ready"

            def is_ready() -> bool:
                assert proc is not None and proc.poll() is None, logfile.read_text()
                return _get(ready)[0] == 200

            await until(is_ready, "ready", 60)
            listing = workers()
            assert [w["index"] for w in listing] == [0, 1] and all(w["ready"] for w in listing), listing
            hbone = listing[0]["ports"]["hbone"]
            assert listing[1]["ports"]["hbone"] == hbone  # one port, two listeners (SO_REUSEPORT)
            pids.extend(w["pid"] for w in listing)

            key_pem = generate_key()
            issued = authority.sign_workload(key_pem.public_key(), SLEEP_ID, datetime.timedelta(hours=1))
            ctx = client_context(accept_issued(issued.pems, key_pem, SLEEP_ID, load_trust_bundle(authority.root_pem)))
            # one tunnel per HBONE connection: each a new TCP connection the kernel gives to either worker
            pool = HbonePool(tcp_connect, lambda _: ctx, max_streams_per_connection=1)
            await n.start(pool.run)
            key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", hbone))

            async def burst(count: int) -> list[int]:
                statuses: list[int] = []

                async def one() -> None:
                    statuses.append(await one_request(pool, key))

                async with trio.open_nursery() as inner:
                    for _ in range(count):
                        inner.start_soon(one)
                sent[0] += statuses.count(200)
                return statuses

            for _ in range(8):  # until both workers have taken connections (the kernel's hash decides)
                assert await burst(8) == [200] * 8
                per_worker = samples(await trio.to_thread.run_sync(metrics), "waypoint_worker_requests_total")
                if all(per_worker.get((("worker", w),), 0) > 0 for w in ("0", "1")):
                    break
            assert all(per_worker[(("worker", w),)] > 0 for w in ("0", "1")), per_worker

            # the merged metrics are the sum of each worker's own (read on its private port)
            def merged_is_sum() -> bool:
                merged = samples(metrics(), "istio_requests_total")
                each = [samples(_get(base(w["ports"]["metrics"]) + "/metrics")[1], "istio_requests_total")
                        for w in workers()]
                summed: dict[tuple[tuple[str, str], ...], float] = {}
                for one in each:
                    for labels, value in one.items():
                        summed[labels] = summed.get(labels, 0.0) + value
                return merged == summed and sum(merged.values()) == sum(per_worker.values())

            assert await trio.to_thread.run_sync(merged_is_sum)
            text = await trio.to_thread.run_sync(metrics)
            assert samples(text, "waypoint_worker_up") == {(("worker", "0"),): 1.0, (("worker", "1"),): 1.0}
            assert samples(text, "waypoint_xds_connected") == {(): 1.0}  # a gauge: the least of the workers'
            stats = json.loads(_get(base(ports["admin"]) + "/stats")[1])
            assert [s["worker"] for s in stats["workers"]] == [0, 1] and stats["draining"] is False

            # a log level set on the primary's admin reaches the worker
            request = urllib.request.Request(base(ports["admin"]) + "/logging?level=info,waypoint.proxy=debug",
                                             method="POST")
            with urllib.request.urlopen(request, timeout=5) as answer:
                assert answer.status == 200
            worker_levels = json.loads(_get(base(workers()[1]["ports"]["admin"]) + "/logging")[1])["levels"]
            assert worker_levels.get("waypoint.proxy") == "debug", worker_levels

            # a killed worker: readiness turns 503 naming it, it is started again, requests keep succeeding
            os.kill(pids[1], signal.SIGKILL)
            await until(lambda: _get(ready)[0] == 503 and "worker 1" in _get(ready)[1], "not ready")

            def restarted() -> bool:
                now = workers()
                return len(now) == 2 and now[1]["pid"] != pids[1] and now[1]["restarts"] == 1 and now[1]["ready"]

            await until(restarted, "worker 1 restarted", 60)
            await until(is_ready, "ready again")
            pids.append(workers()[1]["pid"])
            assert await burst(16) == [200] * 16
            assert 'worker exited' in logfile.read_text()

            # SIGTERM with requests in flight (each takes 1 s at the backend): all of them succeed
            in_flight: list[int] = []

            async def slow() -> None:
                in_flight.append(await one_request(pool, key, "/slow/1"))

            async with trio.open_nursery() as inner:
                for _ in range(8):
                    inner.start_soon(slow)
                await trio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
            assert in_flight == [200] * 8
            sent[0] += 8
            n.cancel_scope.cancel()

    try:
        trio.run(main)
        assert proc is not None
        assert proc.wait(30) == 0, logfile.read_text()
        assert not any(pid_alive(pid) for pid in pids)  # the primary exits after every worker
        log = logfile.read_text()
        assert log.count('"event": "drained"') == 2  # each worker drained as a single waypoint does
        # one text format, each worker's index in the logger name; access lines whole, one JSON object each
        assert " INFO waypoint[1] " in log and " INFO waypoint.workers[0] " in log
        access = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert sum(1 for e in access if e.get("response_code") == 200) == sent[0]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()
        cp.stop()


def test_workers_leave_with_their_primary(tmp_path: Path) -> None:
    """The primary killed (no drain, no goodbye): its workers see their channel close and exit."""
    cp, running, token = control_plane_for_waypoint(tmp_path)
    home = tmp_path / "controlplane"
    admin = free_port()
    logfile = tmp_path / "waypoint.log"
    proc = None
    worker_pid = 0
    with logfile.open("w") as out:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "waypoint.main", "--name", "waypoint", "--namespace", "bookinfo",
                 "--node", "node-1", "--control-plane", f"127.0.0.1:{running.grpc_port}",
                 "--root-cert", str(home / "ca" / "root-cert.pem"), "--token-file", str(token),
                 "--workers", "2", "--drain-seconds", "0.5", "--listen", "127.0.0.1:0",
                 "--metrics-listen", "127.0.0.1:0", "--ready-listen", "127.0.0.1:0",
                 "--admin-listen", f"127.0.0.1:{admin}"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 60
            while not worker_pid:
                assert proc.poll() is None and time.monotonic() < deadline, logfile.read_text()
                code, body = _get(f"http://127.0.0.1:{admin}/workers")
                if code == 200 and json.loads(body)["workers"][1]["ports"]:
                    worker_pid = json.loads(body)["workers"][1]["pid"]
                time.sleep(0.1)
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 30
            while pid_alive(worker_pid):
                assert time.monotonic() < deadline, logfile.read_text()
                time.sleep(0.1)
            assert '"event": "primary gone"' in logfile.read_text()
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if worker_pid and pid_alive(worker_pid):
                os.kill(worker_pid, signal.SIGKILL)
            cp.stop()
