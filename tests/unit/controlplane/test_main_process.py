"""`python -m controlplane.main` as a real process: starts, serves TLS discovery, stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.api.client import ApiClient
from mesh.errors import MeshError
from mesh.process import split_hostport
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]


def test_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.main", "--state-dir", str(tmp_path),
         "--grpc-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    home = tmp_path / "controlplane"
    try:
        deadline = time.monotonic() + 20
        while not (home / "endpoints.json").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "control plane did not start"
            time.sleep(0.05)
        endpoints = json.loads((home / "endpoints.json").read_text())
        root = (home / "ca" / "root-cert.pem").read_bytes()
        token = ApiClient(home / "api.sock", timeout=10).node_token("n1")  # discovery is authenticated
        cfg = ClientConfig(
            target=endpoints["grpc"], node=NodeInfo(id="nodeagent~n1~n1.", role="nodeagent", node="n1"),
            subscriptions={rs.WORKLOAD: None}, root_pem=root, backoff_initial=0.05,
            metadata=(("authorization", f"Bearer {token}"),),
        )
        with XdsClient(cfg) as client:
            assert client.wait_synced(10)
        assert (home / "debug.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not (home / "debug.sock").exists() and not (home / "endpoints.json").exists()
        out = proc.stdout.read() if proc.stdout else ""
        # The components' one log format (`mesh.logs`): DATE TIME LEVEL LOGGER MESSAGE, events as JSON.
        messages = [line.split(" ", 4)[4] for line in out.splitlines() if line.count(" ") >= 4]
        lines = [json.loads(m) for m in messages if m.startswith("{")]
        assert {"started", "connect", "stopping"} <= {entry["event"] for entry in lines}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_split_hostport() -> None:
    assert split_hostport("0.0.0.0:15012") == ("0.0.0.0", 15012)
    assert split_hostport("[::1]:15014") == ("::1", 15014)
    with pytest.raises(MeshError):
        split_hostport("15012")
