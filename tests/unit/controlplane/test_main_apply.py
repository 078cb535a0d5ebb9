"""The control plane process's pieces together: `meshctl apply`/`delete` on the apply API, the store, the
translation, the discovery stream to a real TLS client, and the apply metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import yaml

from ca.auth import NodeAgent, Workload
from controlplane.app import ControlPlaneThread
from controlplane.options import Options
from mesh.api.client import ApiClient
from mesh.errors import MeshError
from mesh.identity import SpiffeId
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo
from meshctl.main import main as meshctl

pytestmark = pytest.mark.timeout(60)

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec:
  clusterIP: {ip}
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080}}]
"""


def test_apply_reaches_client_and_rejects_are_counted(tmp_path: Path) -> None:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    sock = str(tmp_path / "controlplane" / "api.sock")
    token = (("authorization", f"Bearer {running.extras['token_issuer'].mint_node_token('n1')}"),)
    cfg = ClientConfig(
        target=f"127.0.0.1:{running.grpc_port}", node=NodeInfo(id="nodeagent~n1~n1.", role="nodeagent", node="n1"),
        subscriptions={rs.SERVICE: None}, root_pem=running.root_pem, backoff_initial=0.05, metadata=token,
    )
    f = tmp_path / "svc.yaml"

    def vips(c: XdsClient) -> dict[str, list[str]]:
        return {n: list(m.vips) for n, m in c.resources(rs.SERVICE).items()}  # type: ignore[attr-defined]

    key = "default/reviews.default.svc.cluster.local"
    try:
        with XdsClient(cfg) as c:
            assert c.wait_synced(10)
            f.write_text(SERVICE.format(ip="10.96.0.10"))
            assert meshctl(["apply", "-f", str(f), "--socket", sock]) == 0
            assert c.wait_for(lambda c: vips(c).get(key) == ["10.96.0.10"], 10)
            f.write_text(SERVICE.format(ip="10.96.0.11"))
            assert meshctl(["apply", "-f", str(f), "--socket", sock]) == 0
            assert c.wait_for(lambda c: vips(c).get(key) == ["10.96.0.11"], 10)
            f.write_text(SERVICE.format(ip="not-an-ip"))
            assert meshctl(["apply", "-f", str(f), "--socket", sock]) == 1  # refused before sending
            # A client that skips local validation is refused by the control plane, and counted.
            bad = yaml.safe_load(SERVICE.format(ip="not-an-ip"))
            with pytest.raises(MeshError):
                ApiClient(sock).request("POST", "/apply", {"documents": [{"source": "x", "index": 1, "body": bad}]})
            f.write_text(SERVICE.format(ip="10.96.0.11"))
            assert meshctl(["delete", "-f", str(f), "--socket", sock]) == 0
            assert c.wait_for(lambda c: key not in vips(c), 10)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
        assert "controlplane_rejected_applies_total 1.0" in metrics
    finally:
        cp.stop()
    # Nothing applied is lost across a restart: the store is reloaded and served again.
    f.write_text(SERVICE.format(ip="10.96.0.12"))
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    try:
        assert meshctl(["apply", "-f", str(f), "--socket", sock]) == 0
    finally:
        cp.stop()
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    try:
        cfg2 = ClientConfig(
            target=f"127.0.0.1:{running.grpc_port}", node=cfg.node, subscriptions={rs.SERVICE: None},
            root_pem=running.root_pem, backoff_initial=0.05, metadata=token,
        )
        with XdsClient(cfg2) as c:
            assert c.wait_synced(10)
            assert vips(c) == {key: ["10.96.0.12"]}
    finally:
        cp.stop()


def test_tokens_come_from_the_control_plane_and_its_ca_accepts_them(tmp_path: Path) -> None:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    cp.start()
    api = ApiClient(tmp_path / "controlplane" / "api.sock", timeout=10)
    try:
        node_token, workload_token = api.node_token("node-1"), api.workload_token(SpiffeId("cluster.local", "ns", "wp"))
        with pytest.raises(MeshError, match="either"):
            api.request("POST", "/token", {"node": "node-1", "identity": "spiffe://cluster.local/ns/ns/sa/wp"})
        with pytest.raises(MeshError, match="identity"):
            api.request("POST", "/token", {"identity": "not-a-spiffe-id"})
    finally:
        cp.stop()
    # The key stays in the state directory: a restarted control plane accepts what it minted before.
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    try:
        authenticator = running.extras["token_issuer"].authenticator()
        assert authenticator.caller_of(node_token) == NodeAgent("node-1")
        assert authenticator.caller_of(workload_token) == Workload(SpiffeId("cluster.local", "ns", "wp"))
    finally:
        cp.stop()
