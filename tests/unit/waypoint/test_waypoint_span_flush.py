"""A waypoint that stops sends the spans it still holds: `python -m waypoint.main` as a real process, exporting
to a real OTLP receiver with an export interval far longer than the test, so that the spans of the requests it
served reach the receiver only through the flush on SIGTERM."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml
from test_waypoint_process import CONFIG, ROOT, _get, _request, control_plane_for_waypoint, free_port
from waypoint_harness import start_backend
from waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID

from mesh.api.client import ApiClient
from mesh.api.validate import Document
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.secrets.svid import accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context
from mesh.tracing.receiver import OtlpReceiver, TraceStore

pytestmark = pytest.mark.timeout(90)
N = 3

TELEMETRY = """
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: everything, namespace: bookinfo}
spec:
  tracing: [{randomSamplingPercentage: 100.0}]
"""


def test_the_waypoint_flushes_its_spans_on_sigterm(tmp_path: Path) -> None:
    cp, running, token = control_plane_for_waypoint(tmp_path)
    home = tmp_path / "controlplane"
    authority = running.extras["authority"]
    ports = {k: free_port() for k in ("hbone", "metrics", "ready", "admin")}
    store = TraceStore()
    receiver = OtlpReceiver(store.add, "127.0.0.1", 0)
    receiver.start()
    out = (tmp_path / "waypoint.log").open("w")
    proc: subprocess.Popen[str] | None = None

    async def main() -> None:
        nonlocal proc
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "reviews-v1")
            docs = [Document("test", i, b)
                    for i, b in enumerate(yaml.safe_load_all(CONFIG.format(port=backend.port) + TELEMETRY), 1)]
            ApiClient(home / "api.sock", timeout=10).apply(docs)
            proc = subprocess.Popen(
                [sys.executable, "-m", "waypoint.main", "--name", "waypoint", "--namespace", "bookinfo",
                 "--node", "node-1", "--control-plane", f"127.0.0.1:{running.grpc_port}",
                 "--root-cert", str(home / "ca" / "root-cert.pem"), "--token-file", str(token),
                 "--listen", f"127.0.0.1:{ports['hbone']}", "--metrics-listen", f"127.0.0.1:{ports['metrics']}",
                 "--ready-listen", f"127.0.0.1:{ports['ready']}", "--admin-listen", f"127.0.0.1:{ports['admin']}",
                 "--otlp-endpoint", receiver.url, "--otlp-export-interval", "600"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)

            async def sampling() -> object:
                code, dump = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{ports['admin']}/config_dump")
                return json.loads(dump).get("tracing", {}).get("sampling") if code == 200 else None

            with trio.fail_after(30):
                while (await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{ports['ready']}/healthz/ready"))[0] \
                        != 200 or await sampling() != 100.0:
                    assert proc.poll() is None, (tmp_path / "waypoint.log").read_text()
                    await trio.sleep(0.2)

            key_pem = generate_key()
            issued = authority.sign_workload(key_pem.public_key(), SLEEP_ID, datetime.timedelta(hours=1))
            ctx = client_context(accept_issued(issued.pems, key_pem, SLEEP_ID, load_trust_bundle(authority.root_pem)))
            pool = HbonePool(tcp_connect, lambda _: ctx)
            await n.start(pool.run)
            key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", ports["hbone"]))
            for _ in range(N):
                status, _body = await _request(pool, key, "10.96.0.11:9080")
                assert status == 200
            n.cancel_scope.cancel()

    try:
        trio.run(main)
        assert proc is not None
        assert store.received == 0  # nothing is sent on the (ten-minute) timer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        receiver.stop()
        cp.stop()
    spans = [s for t in store.traces() for s in store.trace(t.trace_id)]
    assert len(spans) == N, (tmp_path / "waypoint.log").read_text()
    assert {s.service for s in spans} == {"waypoint.bookinfo"}
    assert all(s.name.startswith("reviews.bookinfo.svc.cluster.local:9080") for s in spans)
