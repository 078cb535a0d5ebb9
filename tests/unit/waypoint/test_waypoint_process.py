"""The waypoint's discovery handler, admin endpoint, and `python -m waypoint.main` as a real process
against a real control plane (discovery and CA over TLS) on 127.0.0.1: certificate with a workload
token, configuration from the store, HBONE in, HTTP routed, metrics, readiness, SIGTERM."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
import yaml
from waypoint_harness import start_backend
from waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID
from waypoint_resources import fq, l7, service, workload

from bench.ports import free_port
from controlplane.app import ControlPlaneThread, Running
from controlplane.options import Options
from mesh.api.client import ApiClient
from mesh.api.validate import Document
from mesh.hbone.errors import TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.secrets.svid import accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context
from mesh.serve.routes import Request
from mesh.xds import resources as rs
from mesh.xds.client_state import Update
from mesh.xds.errors import Rejected
from waypoint.admin import AdminView
from waypoint.config import RouteTable
from waypoint.discovery import WaypointConfig
from waypoint.http.exchange import iterate
from waypoint.http.http1 import Http1Client
from waypoint.l7.model import RequestHead

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[3]


def update(type_url: str, resources: dict) -> Update:
    return Update(type_url=type_url, version="v", nonce="n", updated=resources, removed=(), resources=resources)


def test_discovery_handler_swaps_good_tables_and_refuses_bad_ones() -> None:
    tables: list[RouteTable] = []
    cfg = WaypointConfig("bookinfo/waypoint", tables.append)
    cfg.handle(update(rs.SERVICE, {"bookinfo/reviews": service("reviews", "10.96.0.11")}))
    cfg.handle(update(rs.WORKLOAD, {"bookinfo/reviews-v1": workload("reviews-v1", "10.244.1.5", "reviews")}))
    good = l7("VirtualService", "reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
              [fq("reviews")])
    cfg.handle(update(rs.L7_CONFIG, {"VirtualService/bookinfo/reviews": good}))
    assert len(tables) == 3 and tables[-1].virtual_service(fq("reviews")) is not None
    assert tables[-1].services[fq("reviews")].endpoints[9080][0].address == "10.244.1.5"
    bad = l7("VirtualService", "broken", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"},
                                                                                  "weight": "lots"}]}]}, [fq("reviews")])
    # Accepted per resource (security issue, item 12): the good one is applied, the broken one left out and
    # reported.  (This test used to expect the whole response refused, which held back the good resources.)
    both = {"VirtualService/bookinfo/reviews": good, "VirtualService/bookinfo/broken": bad}
    cfg.handle(update(rs.L7_CONFIG, both))
    assert len(tables) == 4 and cfg.rejected == 0 and tables[-1].virtual_service(fq("reviews")) is not None
    assert "weight" in cfg.summary()["rejected_resources"]["VirtualService/bookinfo/broken"]  # type: ignore[index]
    # A response of which nothing can be applied is refused, and the proxy keeps its table.
    with pytest.raises(Rejected, match="VirtualService bookinfo/broken"):
        cfg.handle(Update(rs.L7_CONFIG, "v", "n", {"VirtualService/bookinfo/broken": bad}, (), both))
    assert len(tables) == 4 and cfg.rejected == 1
    # Configuration for another waypoint is not this one's business, bad or not.
    cfg.handle(update(rs.L7_CONFIG, {"VirtualService/bookinfo/reviews": good,
                                     "VirtualService/bookinfo/broken": l7("VirtualService", "broken", {"hosts": ["x"], "http": [{"route": [{"destination": {"host": "x"}, "weight": "lots"}]}]},
                                                                          waypoints=["other/waypoint"])}))
    assert len(tables) == 5 and cfg.version == 5 and cfg.summary()["rejected_resources"] == {}


def test_admin_view() -> None:
    view = AdminView(lambda: {"version": 3}, lambda: [{"identity": str(WAYPOINT_ID)}], lambda: {"tunnels": 2},
                     name="bookinfo/waypoint")
    assert json.loads(view.handle(Request.parse("GET", "/config_dump")).body) == {"version": 3}
    assert json.loads(view.handle(Request.parse("GET", "/certs")).body)["certificates"][0]["identity"] == str(WAYPOINT_ID)
    assert json.loads(view.handle(Request.parse("GET", "/stats/")).body) == {"tunnels": 2}
    assert view.handle(Request.parse("GET", "/nope")).status == 404
    assert b"bookinfo/waypoint" in view.handle(Request.parse("GET", "/")).body


# ---- the process -----------------------------------------------------------------------------------


CONFIG = """\
apiVersion: v1
kind: Namespace
metadata: {{name: bookinfo, labels: {{istio.io/use-waypoint: waypoint}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  clusterIP: 10.96.0.11
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1, namespace: bookinfo, labels: {{app: reviews, version: v1}}}}
spec:
  nodeName: node-1
  serviceAccountName: bookinfo-reviews
  containers: [{{name: reviews, command: [sleep, "1"], ports: [{{name: http, containerPort: {port}}}]}}]
status: {{phase: Running, podIP: 127.0.0.1}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: bookinfo, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: bookinfo}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: reviews}}}}]
  - route: [{{destination: {{host: reviews}}}}]
"""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def _request(pool: HbonePool, key: PoolKey, authority: str, headers: tuple = (),
                   path: str = "/reviews/0") -> tuple[int, bytes]:
    tunnel = await pool.open_tunnel(key, authority, request_headers(forwarded_for="10.244.1.7:33000"))
    c = Http1Client(tunnel)  # type: ignore[arg-type]
    try:
        await c.send_request(RequestHead("GET", path, "reviews:9080", headers), iterate(b""))
        head = await c.receive_response()
        return head.status, b"".join([chunk async for chunk in c.response_body()])
    finally:
        await c.aclose()


def control_plane_for_waypoint(tmp_path: Path) -> tuple[ControlPlaneThread, Running, Path]:
    """A control plane on 127.0.0.1 (CA, discovery, apply API; its home under `tmp_path`) and a file with a
    workload token for the waypoint's identity, as the waypoint process is started with."""
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    token = tmp_path / "token"
    token.write_text(ApiClient(tmp_path / "controlplane" / "api.sock", timeout=10).workload_token(WAYPOINT_ID))
    return cp, running, token


def test_the_waypoint_process_end_to_end(tmp_path: Path) -> None:
    cp, running, token = control_plane_for_waypoint(tmp_path)
    home = tmp_path / "controlplane"
    authority = running.extras["authority"]
    ports = {k: free_port() for k in ("hbone", "metrics", "ready", "admin")}
    out = (tmp_path / "waypoint.log").open("w")
    proc: subprocess.Popen[str] | None = None

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
                 "--trust-domain", "cluster.local", "--cert-ttl", "600",
                 "--listen", f"127.0.0.1:{ports['hbone']}", "--metrics-listen", f"127.0.0.1:{ports['metrics']}",
                 "--ready-listen", f"127.0.0.1:{ports['ready']}", "--admin-listen", f"127.0.0.1:{ports['admin']}"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
            ready = f"http://127.0.0.1:{ports['ready']}/healthz/ready"
            with trio.fail_after(30):
                while (await trio.to_thread.run_sync(_get, ready))[0] != 200:
                    assert proc.poll() is None, (tmp_path / "waypoint.log").read_text()
                    await trio.sleep(0.2)

            key_pem = generate_key()
            issued = authority.sign_workload(key_pem.public_key(), SLEEP_ID, datetime.timedelta(hours=1))
            ctx = client_context(accept_issued(issued.pems, key_pem, SLEEP_ID, load_trust_bundle(authority.root_pem)))
            pool = HbonePool(tcp_connect, lambda _: ctx)
            await n.start(pool.run)
            key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", ports["hbone"]))
            status, body = await _request(pool, key, "10.96.0.11:9080")
            assert status == 200 and json.loads(body)["backend"] == "reviews-v1"
            status, body = await _request(pool, key, "10.96.0.11:9080", (("end-user", "jason"),))
            assert status == 418 and body == b"fault filter abort"  # the VirtualService reached the waypoint
            with pytest.raises(TunnelRejected) as refused:
                await _request(pool, key, "10.96.0.99:9080")
            assert refused.value.status == 400

            code, metrics = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{ports['metrics']}/metrics")
            assert code == 200
            assert 'istio_requests_total{' in metrics and 'reporter="waypoint"' in metrics
            assert 'response_code="418"' in metrics and 'response_flags="FI"' in metrics
            assert "waypoint_xds_connected 1.0" in metrics
            code, dump = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{ports['admin']}/config_dump")
            config = json.loads(dump)
            assert config["identity"] == str(WAYPOINT_ID) and config["synced"]
            assert config["virtual_services"] == {fq("reviews"): "bookinfo/reviews"}
            code, certs = await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{ports['admin']}/certs")
            assert json.loads(certs)["certificates"][0]["identity"] == str(WAYPOINT_ID)
            n.cancel_scope.cancel()

    try:
        trio.run(main)
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log = (tmp_path / "waypoint.log").read_text()
        access = [e for line in log.splitlines() if line.startswith("{") and "response_code" in (e := json.loads(line))]
        # The client is the HBONE connection's own peer; `Forwarded` (another address here) is not believed.
        assert {e["response_code"] for e in access if e["downstream_peer"].startswith("127.0.0.1:")} >= {200, 418}
        assert '"event": "draining"' in log and '"event": "synced"' in log
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        cp.stop()
