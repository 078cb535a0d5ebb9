"""A pod enrolled for real, without a cluster: a network namespace with the production `PodProxy` (15001,
15006, 15008) and the production capture (iptables rules, or the eBPF programs), an application in it,
and a client namespace on the other end of a veth.  Needs root.

    async with enrolled_pod("iptables") as pod:
        sock = pod.app_socket()              # a socket inside the pod, as its application would make
        sock = pod.client_socket()           # a socket in the client's namespace (outside the mesh)
        pod.app_port                         # an application in the pod that answers with the peer it saw

Everything is named `t-sec-<pid>-<n>-...` and removed on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from ca.authority import CertificateAuthority
from mesh import cgroup, netns
from mesh.hbone.config import ListenerLimits
from mesh.hbone.engine import Engine
from mesh.hbone.pool import HbonePool, tcp_connect
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.errors import NoCertificateError
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context, server_context
from nodeagent.accesslog import AccessLog
from nodeagent.metrics import NodeAgentMetrics
from nodeagent.pods.source import PodRef
from nodeagent.proxy.context import AgentParts, PodContext
from nodeagent.proxy.pod import PodProxy
from nodeagent.redirect.base import Redirector
from nodeagent.redirect.ebpf import EbpfRedirector
from nodeagent.redirect.iptables import IptablesRedirector
from nodeagent.state import WORKLOAD, MeshState

POD_IP = "10.250.0.2"
CLIENT_IP = "10.250.0.1"
APP_PORT = 8080
_names = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class _NoCertificates:
    """The pod has no certificate: HBONE is not what these tests exercise."""

    async def get(self, identity: SpiffeId) -> None:
        raise NoCertificateError(f"no certificate for {identity} in this test")

    def client_context(self, identity: SpiffeId) -> None:
        raise AssertionError("no HBONE in this test")


class Certificates:
    """What the agent asks of its secret manager, served from a CA of the test's own."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority
        self.svids: dict[SpiffeId, Svid] = {}

    def mint(self, identity: SpiffeId) -> Svid:
        key = generate_key()
        issued = self.authority.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1))
        return accept_issued(issued.pems, key, identity, load_trust_bundle(self.authority.root_pem))

    async def get(self, identity: SpiffeId) -> Svid:
        if identity not in self.svids:
            self.svids[identity] = self.mint(identity)
        return self.svids[identity]

    def current(self, identity: SpiffeId) -> Svid | None:
        return self.svids.get(identity)

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return server_context(self.svids[identity])

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        return client_context(self.svids[identity])


@dataclass
class EnrolledPod:
    netns_name: str
    client_netns_name: str
    ref: PodRef
    ctx: PodContext
    registry: CollectorRegistry
    log: io.StringIO
    app_connections: list[AppConnection]
    listeners: dict[int, socket.socket]

    def app_socket(self) -> trio.socket.SocketType:
        with netns.entered(self.netns_name):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return trio.socket.from_stdlib_socket(sock)

    def in_client(self) -> contextlib.AbstractContextManager[None]:
        """The calling thread inside the client's namespace (make sockets there; do not await inside)."""
        return netns.entered(self.client_netns_name)

    def client_socket(self) -> trio.socket.SocketType:
        with netns.entered(self.client_netns_name):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return trio.socket.from_stdlib_socket(sock)

    def refusals(self, reason: str = "self_call") -> float:
        total = 0.0
        for direction in ("inbound", "outbound"):
            total += self.registry.get_sample_value(
                "mesh_agent_connection_failures_total", {"direction": direction, "reason": reason}) or 0.0
        return total


@dataclass
class AppConnection:
    peer: tuple[str, int]
    closed: trio.Event


async def _app(listener: trio.socket.SocketType, seen: list[AppConnection]) -> None:
    """The pod's application: says who it sees as its peer, then echoes."""
    async with trio.open_nursery() as nursery:
        while True:
            conn, peer = await listener.accept()
            record = AppConnection((str(peer[0]), int(peer[1])), trio.Event())
            seen.append(record)
            nursery.start_soon(_answer, conn, record)


async def _answer(conn: trio.socket.SocketType, record: AppConnection) -> None:
    with conn, suppress(OSError):
        await conn.send(f"{record.peer[0]}:{record.peer[1]}\n".encode())
        while data := await conn.recv(65536):
            await conn.send(data)
    record.closed.set()


def _redirector(mode: str) -> Redirector:
    if mode == "ebpf":
        return EbpfRedirector.open(f"t-sec-{os.getpid()}")
    return IptablesRedirector()


@asynccontextmanager
async def enrolled_pod(mode: str = "iptables", *, certs: Certificates | None = None,
                       limits: ListenerLimits | None = None) -> AsyncIterator[EnrolledPod]:
    name = f"t-sec-{os.getpid()}-{next(_names)}"
    pod_ns, client_ns = f"{name}-pod", f"{name}-cli"
    cgroup_dir: Path | None = None
    redirector: Redirector | None = None
    try:
        for ns in (pod_ns, client_ns):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "veth-c", "netns", client_ns, "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        ip("-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        ip("-n", pod_ns, "link", "set", "eth0", "up")
        ip("-n", client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "veth-c")
        ip("-n", client_ns, "link", "set", "veth-c", "up")
        if mode == "ebpf":
            cgroup_dir = cgroup.v2_root() / f"{name}.slice"
            cgroup_dir.mkdir()
        identity = SpiffeId("cluster.local", "t-sec", "app")
        ref = PodRef(uid="t-sec/app", namespace="t-sec", name="app", ip=POD_IP, identity=identity,
                     netns=f"/run/netns/{pod_ns}", cgroup=str(cgroup_dir or ""))
        state = MeshState()
        workload = pb.Workload(uid=ref.uid, name="app", namespace="t-sec", addresses=[POD_IP], node="node-1",
                               service_account="app", tunnel_protocol=pb.HBONE, status=pb.HEALTHY)
        state.apply(WORKLOAD, {ref.uid: workload}, ())
        registry = CollectorRegistry()
        log = io.StringIO()
        redirector = _redirector(mode)
        engine = Engine()  # the data path's, as the agent runs it
        parts = AgentParts(state=state, certs=certs or _NoCertificates(),  # type: ignore[arg-type]
                           pool=HbonePool(tcp_connect, lambda _: None),  # type: ignore[arg-type, return-value]
                           metrics=NodeAgentMetrics.create(registry), log=AccessLog(log),
                           trust_domain="cluster.local", connect_timeout=2.0, redirector=redirector,
                           hbone_limits=limits or ListenerLimits(), engine=engine)
        with netns.entered(pod_ns):
            app_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        app_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        app_sock.bind(("0.0.0.0", APP_PORT))
        app_sock.listen(1024)  # above any test's burst of connections: an overflowing queue drops SYNs, retried after 1, 3, 7 s
        seen: list[AppConnection] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            nursery.start_soon(_app, trio.socket.from_stdlib_socket(app_sock), seen)
            ctx = PodContext(ref, parts)
            proxy = await PodProxy(ctx).start(nursery)
            await trio.to_thread.run_sync(redirector.install, ref, proxy.listeners)
            try:
                yield EnrolledPod(pod_ns, client_ns, ref, ctx, registry, log, seen, proxy.listeners)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(redirector.remove, ref)
                    await proxy.stop()
                    nursery.cancel_scope.cancel()
    finally:
        for ns in (pod_ns, client_ns):
            ip("netns", "del", ns, check=False)
        if cgroup_dir is not None:
            with suppress(OSError):
                cgroup_dir.rmdir()
        if isinstance(redirector, EbpfRedirector):
            forget_pins(redirector)


def forget_pins(redirector: EbpfRedirector) -> None:
    """Close the loader and remove its (by now empty) pin directory."""
    redirector.loader.close()
    with suppress(OSError):
        redirector.loader.root.rmdir()
