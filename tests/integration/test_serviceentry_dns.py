"""ServiceEntries and the node agent's DNS proxy, for real, in both capture modes at once: node-1's agent
captures with iptables, node-2's with eBPF, and each test runs from a client pod on each node.

Outside the mesh (namespace `outside`): an echo server (the "external" host) and a tiny DNS server,
which is the agents' upstream resolver (`--dns-upstream`).  Inside (`apps`, ambient): the clients, and
ServiceEntries for the echo server, one STATIC (its address as the endpoint), one DNS (its name, which
the agent resolves through the upstream), one with a wildcard host, and one bound to a waypoint
(`istio.io/use-waypoint`), where an AuthorizationPolicy can deny it: an external host has no node agent
of its own, so, as in Istio, the waypoint is where policy applies to it.  The pods' resolv.conf names
127.0.0.1 as their nameserver, which nothing serves: every answer they get comes from the agent's proxy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.translate.serviceentries import allocate
from localcluster.plan import make_plan
from localcluster.spec import load
from tests.integration.conftest import Meshctl
from tests.integration.test_mesh import Mesh, eventually

PODTOOLS = Path(__file__).resolve().parent / "podtools"
NAME = "t-dns"
CLIENTS = {"node-1": "client-1", "node-2": "client-2"}  # node-1 captures with iptables, node-2 with eBPF
UPSTREAM_PORT = 5353
WILDCARD_VIP = "240.241.0.9"

CLUSTER = f"""
apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata:
  name: {NAME}
spec:
  serviceCIDR: 10.96.0.0/16
  nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
    redirectMode: iptables
  - name: node-2
    podCIDR: 10.244.2.0/24
    redirectMode: ebpf
---
apiVersion: v1
kind: Namespace
metadata:
  name: apps
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata:
  name: outside
---
apiVersion: v1
kind: Pod
metadata:
  name: client-1
  namespace: apps
  labels: {{app: hello}}
spec:
  nodeName: node-1
  containers:
  - name: echo
    command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "7000"]
    ports: [{{containerPort: 7000}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client-2
  namespace: apps
  labels: {{app: other}}
spec:
  nodeName: node-2
  containers:
  - name: echo
    command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "7000"]
    ports: [{{containerPort: 7000}}]
---
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: apps
spec:
  selector: {{app: hello}}
  ports: [{{port: 7000}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: extsrv
  namespace: outside
  labels: {{app: extsrv}}
spec:
  nodeName: node-1
  containers:
  - name: echo
    command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "8080"]
    ports: [{{containerPort: 8080}}]
"""

UPSTREAM_POD = """
---
apiVersion: v1
kind: Pod
metadata:
  name: dns
  namespace: outside
spec:
  nodeName: node-2
  containers:
  - name: dns
    command: [{python}, {tool}, "{port}", "ext.example.test={ext}", "upstream-only.test=192.0.2.55"]
"""


def entries(ext_ip: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-static, namespace: apps}}
spec:
  hosts: [static.example.test]
  ports: [{{number: 8080, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {ext_ip}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-dns, namespace: apps}}
spec:
  hosts: [ext.example.test]
  ports: [{{number: 8080, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: wild, namespace: apps}}
spec:
  hosts: ["*.wild.test"]
  addresses: [{WILDCARD_VIP}]
  ports: [{{number: 8080, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {ext_ip}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ext-egress
  namespace: apps
  labels: {{istio.io/use-waypoint: waypoint}}
spec:
  hosts: [egress.example.test]
  ports: [{{number: 8080, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {ext_ip}}}]
"""

DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-egress, namespace: apps}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{from: [{source: {namespaces: [apps]}}], to: [{operation: {ports: ["8080"]}}]}]
"""


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("dns")
    path = tmp / f"{NAME}.yaml"
    path.write_text(CLUSTER)
    plan = make_plan(load(path))
    ext_ip = str(next(p.ip for p in plan.pods if p.name == "extsrv"))
    path.write_text(CLUSTER + UPSTREAM_POD.format(python=sys.executable, tool=PODTOOLS / "dns_server.py",
                                                  port=UPSTREAM_PORT, ext=ext_ip))
    upstream = str(next(p.ip for p in make_plan(load(path)).pods if p.name == "dns"))
    m = Mesh(NAME, meshctl, "mixed")
    m.tmp = tmp  # type: ignore[attr-defined]
    try:
        meshctl("cluster", "up", "-f", str(path), f"--agent-arg=--dns-upstream={upstream}:{UPSTREAM_PORT}",
                "--agent-arg=--dns-timeout=1")
        m.ctl("waypoint", "apply", "-n", "apps")
        m.apply(entries(ext_ip), tmp)

        def enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(f"apps/{c}") == "enrolled" for c in CLIENTS.values())

        eventually(enrolled, timeout=30)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False)


def steps(mesh: Mesh, pod: str, *steps: tuple[str, ...]) -> list[dict]:
    """Run the steps of `podtools/dns_client.py` in one process of the pod; their results."""
    argv = [a for i, one in enumerate(steps) for a in ((("+",) if i else ()) + one)]
    out = mesh.exec("apps", pod, sys.executable, str(PODTOOLS / "dns_client.py"), *argv, check=False)
    assert out.returncode == 0, f"dns_client {' '.join(argv)} in {pod}: {out.stdout}{out.stderr}"
    results: list[dict] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def client(mesh: Mesh, pod: str, *args: str) -> dict:
    return steps(mesh, pod, args)[0]


def service_ip(mesh: Mesh, ns: str, name: str) -> str:
    return next(s["clusterIP"] for s in mesh.status()["plan"]["services"] if s["namespace"] == ns and s["name"] == name)


def vip(host: str) -> str:
    return allocate(["apps/static.example.test", "apps/ext.example.test", "apps/egress.example.test"])[f"apps/{host}"]


@pytest.mark.parametrize("node", sorted(CLIENTS))
def test_service_names_resolve_through_the_proxy(mesh: Mesh, node: str) -> None:
    pod = CLIENTS[node]
    ip = service_ip(mesh, "apps", "hello")
    names = (("udp", "hello"), ("udp", "hello.apps"), ("tcp", "hello.apps.svc"), ("udp", "hello.apps.svc.cluster.local"))
    got = steps(mesh, pod, *(("query", protocol, name) for protocol, name in names),
                ("query", "udp", "hello.apps.svc.cluster.local", "28"),
                ("garbage", "udp"), ("garbage", "tcp"), ("query", "udp", "hello"))
    for (protocol, name), answer in zip(names, got, strict=False):
        assert answer["rcode"] == 0 and answer["answers"] == [ip] and answer["id_matches"], (protocol, name, answer)
        assert answer["from"] == "127.0.0.1:53"  # the answer shows the server the pod asked
    aaaa, bad_udp, bad_tcp, after = got[len(names):]
    assert aaaa["rcode"] == 0 and aaaa["answers"] == []
    for bad in (bad_udp, bad_tcp):  # bytes that are no query: FORMERR, and the proxy goes on answering
        reply = bytes.fromhex(bad["reply"])
        assert reply[:2] == b"\x42\x42" and reply[2] & 0x80 and reply[3] & 0xF == 1, reply
    assert after["answers"] == [ip]
    node_log = mesh.agent_log(node)
    assert '"event": "dns_bad_query"' in node_log and "exactly one question" in node_log


@pytest.mark.parametrize("node", sorted(CLIENTS))
def test_entry_hosts_resolve_and_the_rest_is_forwarded(mesh: Mesh, node: str) -> None:
    got = steps(mesh, CLIENTS[node], ("getaddrinfo", "static.example.test"), ("getaddrinfo", "ext.example.test"),
                ("getaddrinfo", "a.b.wild.test"), ("getaddrinfo", "upstream-only.test"),
                ("query", "tcp", "upstream-only.test"), ("query", "udp", "nowhere.test"))
    assert [g.get("addresses") for g in got[:4]] == [
        [vip("static.example.test")], [vip("ext.example.test")], [WILDCARD_VIP],
        ["192.0.2.55"]]  # the last one is not the mesh's: the upstream answers
    assert got[4]["answers"] == ["192.0.2.55"]
    assert got[5]["rcode"] == 3  # NXDOMAIN from the upstream, passed on
    metrics = mesh.metrics(node)
    assert 'istio_dns_requests_total{request_protocol="udp",request_query_type="a"' in metrics
    assert "istio_dns_upstream_requests_total" in metrics


def test_meshctl_shows_the_entries(mesh: Mesh) -> None:
    listed = mesh.ctl("get", "serviceentry", "-n", "apps").stdout
    assert all(name in listed for name in ("ext-static", "ext-dns", "wild", "ext-egress")), listed
    services = mesh.ctl("agent", "services", "node-1").stdout
    assert "static.example.test (serviceentry/ext-static: STATIC, external)" in services, services
    assert vip("ext.example.test") in services and "ext.example.test (serviceentry/ext-dns: DNS, external)" in services
    data = json.loads(mesh.ctl("agent", "services", "node-2", "-o", "json").stdout)
    dns = next(s for s in data["services"] if s["hostname"] == "ext.example.test")
    assert (dns["resolution"], dns["mesh_external"], dns["vips"]) == ("RESOLUTION_DNS", True, [vip("ext.example.test")])


@pytest.mark.parametrize("node", sorted(CLIENTS))
def test_external_host_is_reached_through_static_and_dns_entries(mesh: Mesh, node: str) -> None:
    hosts = ("static.example.test", "ext.example.test", "x.wild.test")
    got = steps(mesh, CLIENTS[node], *(("connect", host, "8080") for host in hosts))
    assert got == [{"echo": "hello\n"}] * len(hosts), got
    log = [e for e in mesh.access_log(node) if e.get("direction") == "outbound"
           and e.get("destination_service", "").endswith("example.test")]
    assert {e["destination_service"] for e in log} >= {"static.example.test", "ext.example.test"}
    # plain TCP from the source's agent, straight to the external host
    assert {e["connection_security_policy"] for e in log if e["destination_service"] != "egress.example.test"} == {
        "none"}


def test_policy_at_the_waypoint_denies_the_external_host(mesh: Mesh) -> None:
    def through_waypoint() -> bool:
        """the entry bound to the waypoint reaches the external host"""
        return all(client(mesh, pod, "connect", "egress.example.test", "8080") == {"echo": "hello\n"}
                   for pod in CLIENTS.values())

    eventually(through_waypoint, timeout=30, interval=1.0)
    # carried over HBONE to the waypoint (which connects to the external host in plain TCP)
    carried = {(e["destination_service"], e["destination_principal"], e["connection_security_policy"])
               for node in CLIENTS for e in mesh.access_log(node) if e.get("direction") == "outbound"
               and e.get("destination_service") == "egress.example.test"}
    assert carried == {("egress.example.test", "spiffe://cluster.local/ns/apps/sa/waypoint", "mutual_tls")}
    tmp = mesh.tmp  # type: ignore[attr-defined]
    mesh.apply(DENY, tmp)
    try:
        def denied() -> bool:
            """the waypoint refuses the external host to both clients"""
            return all(client(mesh, pod, "connect", "egress.example.test", "8080").get("echo") != "hello\n"
                       for pod in CLIENTS.values())

        eventually(denied, timeout=30, interval=1.0)
        assert '"event":"connection denied"' in (mesh.dir / "logs" / "apps.waypoint.log").read_text()
        # the entries without a waypoint are not the waypoint's to judge
        assert client(mesh, CLIENTS["node-1"], "connect", "static.example.test", "8080") == {"echo": "hello\n"}
    finally:
        mesh.delete(DENY, tmp)
