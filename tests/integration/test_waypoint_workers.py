"""A waypoint with two worker processes in a bookinfo cluster (`t-workers`): one waypoint to everyone.

`meshctl waypoint apply --workers 2` starts the waypoint's primary, which starts its second worker; both
listen on the pod's 15008 (SO_REUSEPORT).  HBONE connections made straight to the waypoint (a mesh
certificate, one tunnel per connection, from an uncaptured pod) are spread by the kernel until both workers
have served requests (`waypoint_worker_requests_total` in the merged metrics); the merged metrics are the
sum of what each worker serves on its own loopback port; readiness waits for every worker; a killed worker
is started again and requests keep succeeding; and `meshctl waypoint delete` under load drains both
workers with no request failing.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mesh import netns
from tests.integration.conftest import Meshctl, cluster_file
from tests.integration.test_mesh import Mesh, eventually
from tests.integration.test_waypoint_lifecycle import LOAD

NS = "bookinfo"
CLUSTER = "t-workers"
SLEEP = "spiffe://cluster.local/ns/bookinfo/sa/sleep"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


class Workers(Mesh):
    tools: Path = Path()

    def in_waypoint(self, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.pod_netns(NS, "waypoint"), "curl", "-sS", "-m", "5",
                               *extra, url], capture_output=True, text=True)

    def workers(self) -> list[dict[str, Any]]:
        out = self.in_waypoint("http://127.0.0.1:15000/workers")
        return json.loads(out.stdout)["workers"] if out.returncode == 0 and out.stdout.startswith("{") else []

    def ready(self) -> str:
        return self.in_waypoint("http://127.0.0.1:15021/healthz/ready").stdout.strip()

    def waypoint_metrics(self, port: int = 15020) -> str:
        return self.in_waypoint(f"http://127.0.0.1:{port}/metrics").stdout

    def waypoint_log(self) -> str:
        path = self.dir / "logs" / f"{NS}.waypoint.log"
        return path.read_text() if path.exists() else ""

    def through_waypoint(self) -> int:
        """Requests to reviews in the waypoint's access log (every worker's)."""
        return sum(1 for line in self.waypoint_log().splitlines()
                   if line.startswith("{") and json.loads(line).get("authority") == "reviews:9080")

    def reviews_vip(self) -> str:
        out = self.ctl("get", "service", "reviews", "-n", NS, "-o", "json").stdout
        return str(json.loads(out)["spec"]["clusterIP"])


def client_context(mesh: Mesh) -> ssl.SSLContext:
    """A mesh certificate for bookinfo's sleep identity, from the cluster's CA."""
    from ca.authority import CertificateAuthority
    from mesh.identity import SpiffeId
    from mesh.secrets.svid import generate_key

    authority = CertificateAuthority.load_or_create(mesh.dir / "controlplane" / "ca", trust_domain="cluster.local")
    key = generate_key()
    issued = authority.sign_workload(key.public_key(), SpiffeId("cluster.local", NS, "sleep"),
                                     datetime.timedelta(minutes=30))
    tmp = Path(tempfile.mkdtemp())
    (tmp / "key.pem").write_bytes(key.pkcs8_pem())
    (tmp / "chain.pem").write_text("".join(issued.pems))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
    return ctx


def direct_requests(mesh: Workers, count: int) -> list[int]:
    """`count` requests to reviews, each in its own HBONE connection to the waypoint, from the legacy sleep
    pod's network namespace (not captured); their statuses."""
    from mesh.hbone.headers import request_headers
    from mesh.hbone.pool import HbonePool, PoolKey
    from mesh.identity import SpiffeId
    from waypoint.http.exchange import iterate
    from waypoint.http.http1 import Http1Client
    from waypoint.l7.model import RequestHead

    ctx = client_context(mesh)
    where = mesh.pod_netns("legacy", "sleep")
    address = (mesh.pod_ip(NS, "waypoint"), 15008)
    authority = f"{mesh.reviews_vip()}:9080"

    async def connect(_: PoolKey) -> trio.SocketStream:
        with netns.entered(where):
            raw = socket.socket()
        sock = trio.socket.from_stdlib_socket(raw)
        await sock.connect(address)
        return trio.SocketStream(sock)

    async def main() -> list[int]:
        statuses: list[int] = []
        async with trio.open_nursery() as nursery:
            pool = HbonePool(connect, lambda _: ctx, max_streams_per_connection=1)
            await nursery.start(pool.run)
            key = PoolKey(source=SpiffeId("cluster.local", NS, "sleep"),
                          destination=SpiffeId("cluster.local", NS, "waypoint"), address=address)

            async def one() -> None:
                tunnel = await pool.open_tunnel(key, authority, request_headers())
                client = Http1Client(tunnel)  # type: ignore[arg-type]
                try:
                    await client.send_request(RequestHead("GET", "/reviews/0", "reviews:9080", ()), iterate(b""))
                    head = await client.receive_response()
                    async for _ in client.response_body():
                        pass
                    statuses.append(head.status)
                finally:
                    await client.aclose()

            with trio.fail_after(60):
                async with trio.open_nursery() as inner:
                    for _ in range(count):
                        inner.start_soon(one)
            nursery.cancel_scope.cancel()
        return statuses

    return trio.run(main)


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[Workers]:
    m = Workers(CLUSTER, meshctl)
    m.tools = pod_files("workers-tools")
    (m.tools / "load.py").write_text(LOAD)
    path = cluster_file(tmp_path_factory.mktemp("workers"), CLUSTER)
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace", "--workers", "2", "--drain-seconds", "3")

        def served() -> bool:
            """the sleep pod reaches reviews through the waypoint"""
            return ('"service": "reviews"' in m.curl(NS, "sleep", "http://reviews:9080/reviews/0").stdout
                    and m.through_waypoint() > 0)

        eventually(served, timeout=90, interval=0.5)
        yield m
    finally:
        meshctl("cluster", "down", CLUSTER, check=False)


def test_both_workers_serve_and_the_metrics_are_their_sum(mesh: Workers) -> None:
    listing = mesh.workers()
    assert [w["index"] for w in listing] == [0, 1] and all(w["ready"] for w in listing), listing
    assert listing[0]["ports"]["hbone"] == listing[1]["ports"]["hbone"] == 15008
    assert mesh.ready() == "ready"

    per_worker: dict[tuple[tuple[str, str], ...], float] = {}
    for _ in range(8):  # the kernel's hash picks the worker of each connection: until both have served
        assert direct_requests(mesh, 8) == [200] * 8
        per_worker = samples(mesh.waypoint_metrics(), "waypoint_worker_requests_total")
        if all(per_worker.get((("worker", w),), 0) > 0 for w in ("0", "1")):
            break
    assert all(per_worker.get((("worker", w),), 0) > 0 for w in ("0", "1")), per_worker

    def merged_is_the_sum() -> bool:
        merged = samples(mesh.waypoint_metrics(), "istio_requests_total")
        summed: dict[tuple[tuple[str, str], ...], float] = {}
        for worker in mesh.workers():
            for labels, value in samples(mesh.waypoint_metrics(worker["ports"]["metrics"]), "istio_requests_total").items():
                summed[labels] = summed.get(labels, 0.0) + value
        return bool(merged) and merged == summed

    eventually(merged_is_the_sum, timeout=15)  # the node agents' own traffic may land between two reads
    # one waypoint's names: the merged exposition has what a single process has
    text = mesh.waypoint_metrics()
    assert 'reporter="waypoint"' in text and samples(text, "waypoint_xds_connected") == {(): 1.0}


def test_a_killed_worker_is_restarted_and_requests_keep_succeeding(mesh: Workers) -> None:
    before = mesh.workers()[1]
    os.kill(before["pid"], signal.SIGKILL)

    def restarted() -> bool:
        now = mesh.workers()
        return len(now) == 2 and now[1]["pid"] != before["pid"] and now[1]["ready"]

    eventually(restarted, timeout=60, interval=0.2)
    eventually(lambda: mesh.ready() == "ready", timeout=30)
    assert mesh.workers()[1]["restarts"] == before["restarts"] + 1
    assert '"event": "worker exited"' in mesh.waypoint_log()
    assert direct_requests(mesh, 16) == [200] * 16
    assert '"service": "reviews"' in mesh.curl(NS, "sleep", "http://reviews:9080/reviews/0").stdout


def test_delete_under_load_drains_both_workers(mesh: Workers) -> None:
    pids = [w["pid"] for w in mesh.workers()]
    stop = mesh.tools / "stop"
    stop.unlink(missing_ok=True)
    spec = {"host": "reviews", "port": 9080, "path": "/reviews/0", "rate": 40, "timeout": 10, "stop": str(stop)}
    load = mesh.meshctl.popen("exec", "--cluster", CLUSTER, "-n", NS, "sleep", "--", sys.executable,
                              str(mesh.tools / "load.py"), json.dumps(spec))
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "started"
        already = mesh.through_waypoint()
        eventually(lambda: mesh.through_waypoint() >= already + 20, timeout=60)
        mesh.ctl("waypoint", "delete", "-n", NS, "--timeout", "60")
        eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), timeout=30)
        stop.touch()
        out, _ = load.communicate(timeout=60)
    finally:
        stop.touch()
        if load.poll() is None:
            load.kill()
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["sent"] > 0 and counts["failed"] == 0, counts
    log = mesh.waypoint_log()
    assert log.count('"event": "drained"') >= 2  # each worker drained as one waypoint does
    assert " waypoint.workers[0] " in log and " waypoint[1] " in log  # one format, the worker in the logger
