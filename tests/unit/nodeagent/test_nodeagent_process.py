"""`python -m nodeagent.main` as a real process against a real control plane on 127.0.0.1 (no pods, so no
root needed): its node token asked of the control plane, discovery over TLS, the serving endpoints, and
a clean exit on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.ports import free_port
from controlplane.app import ControlPlaneThread
from controlplane.options import Options
from mesh.api.client import ApiClient
from mesh.serve.client import Endpoint, get
from mesh.serve.errors import HttpClientError

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        reply = get(Endpoint.tcp("127.0.0.1", port), path, timeout=2)
    except HttpClientError as exc:
        return 0, str(exc)
    return reply.status, reply.text


def test_the_node_agent_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    home = tmp_path / "controlplane"
    token = tmp_path / "token"
    token.write_text(ApiClient(home / "api.sock", timeout=10).node_token("node-1"))
    ports = {k: free_port() for k in ("admin", "metrics", "ready")}
    log = tmp_path / "nodeagent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.main", "--node", "node-1",
             "--control-plane", f"127.0.0.1:{running.grpc_port}", "--root-cert", str(home / "ca" / "root-cert.pem"),
             "--token-file", str(token), "--pod-netns", str(tmp_path / "netns" / "{namespace}.{name}"),
             "--admin-listen", f"127.0.0.1:{ports['admin']}", "--metrics-listen", f"127.0.0.1:{ports['metrics']}",
             "--ready-listen", f"127.0.0.1:{ports['ready']}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while fetch(ports["ready"], "/healthz/ready") != (200, "ready\n"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        status, metrics = fetch(ports["metrics"], "/metrics")
        assert status == 200 and "mesh_agent_enrolled_pods 0.0" in metrics
        status, index = fetch(ports["admin"], "/")
        assert status == 200 and "node agent admin on node-1" in index and "/config_dump" in index
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        text = log.read_text()
        assert '"event": "ready", "node": "node-1"' in text and '"event": "stopping", "node": "node-1"' in text
        # What the agent built before its first pod is kept from the cyclic collector's passes.
        frozen = re.search(r'"event": "heap_frozen", "objects": (\d+)', text)
        assert frozen and int(frozen.group(1)) > 10_000, text
        assert text.index('"event": "heap_frozen"') < text.index('"event": "ready"')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cp.stop()
