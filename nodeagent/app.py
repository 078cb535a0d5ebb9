"""The node agent, assembled: the one place that shows how its parts fit, top to bottom (`serve`).

    state (fed by discovery) ──> enroller ──> PodProxy per enrolled pod (15001, 15006, 15008 in the pod)
                                                 │ outbound ──> HBONE pool (connections from the pod)
                                                 │ inbound  ──> authorization ──> the application
                                                 │   (decided again on policy updates: `Rechecker`)
                                                 │ DnsProxy (127.0.0.1:15053, trio) ──> upstream resolver
                                              (the pods' connections run on the data path engine:
                                               uvloop in a thread of its own; the rest is trio)
    certificates (CA, on behalf of the node's pods)   metrics :15020   readiness :15021   admin :15000
    tunnel spans (`nodeagent.tracing`) ──> OTLP exporter (--otlp-endpoint), in the background
    memory: the freed heap returned to the system after a load drops (`memory.Trimmer`)

`serve` reads in order: metrics registry, mesh state, certificates (the CA, asked on behalf of the node's
pods with the node's token), discovery feeding the state, the serving endpoints, then the enroller, which
starts a `PodProxy` (the pod's listeners) for every pod of this node in the mesh (`open_pod_source`:
discovery and a netns path format, or the CNI plugin's handovers on `--cni-socket`).  `run` is the process
(`mesh.runtime`): it serves until SIGTERM; the pods keep their capture, and the next run adopts it.

A restart refuses no connection (ztunnel's way): the next agent starts beside this one and shares every
port it listens on, in the pods and on the node (`mesh.reuseport`), taking the new connections as soon as
it listens; it adopts the pods' capture as it is, and takes the CNI socket over.  On SIGTERM this one
stops changing capture (enrollment and the CNI socket end first, and nothing is removed), closes its
listeners (what they had queued migrates to the successor's), tells its HBONE clients to go elsewhere
(GOAWAY), lets the open connections finish for up to `--drain-seconds` (`Agent.drain`), sends the spans
still queued (a second at most), and exits.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from mesh import runtime
from mesh.errors import MeshError
from mesh.hbone.aiopool import AioPool
from mesh.hbone.config import ListenerLimits
from mesh.hbone.engine import Engine
from mesh.secrets.manager import SecretManager
from mesh.serve.endpoints import Readiness
from mesh.tracing.span import Resource
from mesh.xds import resources as rs
from mesh.xds.client_state import Update
from mesh.xds.node import ROLE_NODEAGENT, NodeInfo
from mesh.xds.trio_client import TrioXdsClient
from nodeagent.accesslog import AccessLog
from nodeagent.admin import AdminView
from nodeagent.dns.metrics import DnsMetrics
from nodeagent.dns.server import DnsProxy, PodDns
from nodeagent.dns.upstream import Resolver, Upstream
from nodeagent.enroll import Enroller
from nodeagent.memory import Trimmer
from nodeagent.metrics import NodeAgentMetrics
from nodeagent.options import Options
from nodeagent.pods.cni import CniPodSource
from nodeagent.pods.handover import HandoverServer
from nodeagent.pods.local import LocalPodSource
from nodeagent.pods.source import PodRef, PodSource
from nodeagent.proxy import outbound
from nodeagent.proxy.context import AgentParts, PodContext, pool_connect
from nodeagent.proxy.pod import PodProxy
from nodeagent.proxy.recheck import Rechecker
from nodeagent.proxy.sockets import SocketSupply
from nodeagent.redirect.base import Redirector
from nodeagent.redirect.ebpf import EbpfRedirector
from nodeagent.redirect.iptables import IptablesRedirector
from nodeagent.state import AUTHORIZATION, SERVICE, WORKLOAD, MeshState
from nodeagent.tracing import TelemetryView, TunnelTracer

log = logging.getLogger("nodeagent")

KIND_OF_TYPE = {rs.WORKLOAD: WORKLOAD, rs.SERVICE: SERVICE, rs.AUTHORIZATION: AUTHORIZATION}
SUBSCRIPTIONS: dict[str, list[str] | None] = {rs.WORKLOAD: None, rs.SERVICE: None, rs.AUTHORIZATION: None,
                                               rs.L7_CONFIG: None}  # L7Config: agents are sent only Telemetry


DRAIN_POLL = 0.1  # seconds between looks at what is still open while draining


def run(opts: Options) -> int:
    """The process, until SIGTERM or SIGINT (then it drains); the exit status."""
    return runtime.run(opts, functools.partial(serve, opts), log,
                       f'{{"event": "stopping", "node": "{opts.node}", "drain_seconds": {opts.drain_seconds:g}}}')


async def serve(opts: Options, stop: trio.Event | None = None) -> None:
    """The node agent, until `stop` is set (then it drains and returns) or it is cancelled."""
    stop = trio.Event() if stop is None else stop
    registry = CollectorRegistry()
    state = MeshState()
    telemetry = TelemetryView()  # tracing's sampling per namespace, also fed by discovery
    node = NodeInfo(id="", role=ROLE_NODEAGENT, node=opts.node)
    redirector = open_redirector(opts.redirect_mode, opts.bpf_prefix, opts.dns_capture)  # refuses to start when the mode cannot work here
    log.info('{"event": "capture", "mode": "%s"}', redirector.mode)
    async with runtime.open_certificates(opts, impersonate=True) as certs, \
            runtime.open_discovery(opts, node, SUBSCRIPTIONS, functools.partial(apply_update, state, telemetry)) as xds, \
            trio.open_nursery() as nursery:
        agent = Agent(opts, state, certs, registry, xds, nursery, redirector, telemetry)
        await nursery.start(agent.engine.run)
        await runtime.start_tracing(nursery, agent.tracer)
        admin = AdminView(state, certs.status, node=opts.node, capture_mode=redirector.mode,
                          enrollment=agent.enrollment, capture=agent.capture)
        # reuse_port: an agent started beside this one (a restart, a DaemonSet's surge) takes them over.
        await runtime.start_serving(nursery, opts, registry=registry, ready=agent.readiness, admin=admin.handle,
                                    reuse_port=True)
        try:
            async with trio.open_nursery() as enrollment:  # all that changes capture: stopped before the drain
                enrollment.start_soon(enroll_pods, opts, agent)
                await stop.wait()
                enrollment.cancel_scope.cancel()
            await agent.drain(opts.drain_seconds)
            await runtime.flush_tracing(agent.tracer)  # the drained tunnels' spans, within a short deadline
        finally:
            agent.close_pods()
        nursery.cancel_scope.cancel()


async def enroll_pods(opts: Options, agent: Agent) -> None:
    """Once discovery has synced: the enroller over the node's pods (and the CNI plugin's socket, once
    handed-over pods can be enrolled); then the gauges, every second."""
    await runtime.wait_synced(agent.xds, opts, log, on_wait=agent.report)
    runtime.freeze_heap(log)  # before the first pod's connections
    agent.synced = True
    agent.pods = pods = await open_pod_source(opts, agent.state)
    agent.enroller = enroller = Enroller(pods, agent.parts.redirector, agent.start_pod)
    async with trio.open_nursery() as nursery:
        await nursery.start(enroller.run)
        if isinstance(pods, CniPodSource):
            await nursery.start(HandoverServer(opts.cni_socket, pods, enroller).serve)
        nursery.start_soon(Trimmer(agent.open_connections, opts.memory_trim_interval).run)
        agent.taking_pods = True
        log.info('{"event": "ready", "node": "%s", "enrolled": %d}', opts.node, len(enroller.enrolled))
        while True:
            agent.report()
            await trio.sleep(1.0)


async def open_pod_source(opts: Options, state: MeshState) -> PodSource:
    """Where the agent learns its node's pods: discovery and a netns path format (local), or the CNI
    plugin's handovers, with the pods that already run (cni: the record in --state-dir, then a scan)."""
    if opts.pod_source == "cni":
        return await trio.to_thread.run_sync(functools.partial(
            CniPodSource.open, state, opts.node, state_dir=opts.state_dir, cgroup_format=opts.pod_cgroup,
            trust_domain=opts.trust_domain))
    return LocalPodSource(state, opts.node, opts.pod_netns, opts.pod_cgroup)


def open_redirector(mode: str, bpf_prefix: str, dns_capture: bool = False) -> Redirector:
    """The capture mechanism of this node: iptables rules in each pod, or eBPF programs (with the pods'
    DNS queries sent to the agent's DNS proxy when `dns_capture`)."""
    if mode == "ebpf":
        return EbpfRedirector.open(bpf_prefix, dns_capture=dns_capture)
    return IptablesRedirector(dns_capture=dns_capture)


def apply_update(state: MeshState, telemetry: TelemetryView, update: Update) -> None:
    """The discovery handler: the only writer of the agent's state (raising NACKs the update)."""
    if update.type_url == rs.L7_CONFIG:
        telemetry.apply(update.resources)
        return
    kind = KIND_OF_TYPE.get(update.type_url)
    if kind is None:
        return
    state.apply(kind, dict(update.updated), update.removed, update.version)


class Agent:
    """The agent's parts that outlive one pod, and what the endpoints read of them."""

    def __init__(self, opts: Options, state: MeshState, certs: SecretManager, registry: CollectorRegistry,
                 xds: TrioXdsClient, nursery: trio.Nursery, redirector: Redirector,
                 telemetry: TelemetryView | None = None) -> None:
        self.state = state
        self.certs = certs
        self.xds = xds
        self.metrics = NodeAgentMetrics.create(registry)
        self.tracer = runtime.tracer(opts, Resource.of({"service.name": "nodeagent", "service.instance.id": opts.node,
                                                        "k8s.node.name": opts.node}), registry)
        self.engine = Engine()
        upstream = Upstream(opts.dns_upstream, opts.dns_timeout)
        self.dns = DnsProxy(state, upstream, DnsMetrics(registry)) if opts.dns_capture else None
        sockets = SocketSupply()
        self.pool = AioPool(pool_connect(sockets, opts.connect_timeout), certs.client_context,
                            connect_timeout=opts.connect_timeout, certificate=certs.current)
        self.parts = AgentParts(state=state, certs=certs, pool=self.pool, metrics=self.metrics,
                                log=AccessLog(sys.stdout), trust_domain=opts.trust_domain,
                                connect_timeout=opts.connect_timeout, redirector=redirector,
                                hbone_limits=ListenerLimits(opts.hbone_max_connections, opts.hbone_max_handshakes),
                                tracer=TunnelTracer(self.tracer, opts.node, telemetry)
                                if self.tracer.exporting else None,
                                engine=self.engine, sockets=sockets, resolver=Resolver(upstream))
        # Inbound connections admitted before an authorization update are decided again after it.
        self.rechecker = Rechecker(self.engine, state, self.parts.admitted)
        state.on_change(self.rechecker.on_change)
        self.pods: PodSource | None = None
        self.enroller: Enroller | None = None
        self.synced = False
        self.taking_pods = False  # the enroller runs, and the CNI plugin's socket is this agent's
        self.draining = False
        self._node = opts.node
        self._nursery = nursery

    async def start_pod(self, ref: PodRef) -> PodProxy:
        proxy = await PodProxy(PodContext(ref, self.parts)).start(self._nursery)
        if self.dns is not None:  # the pod's DNS proxy, closed with its listeners
            try:
                pod_dns = PodDns.open(ref, self.dns)
            except BaseException:
                await proxy.stop()
                raise
            await self._nursery.start(pod_dns.serve)
            proxy.companions.append(pod_dns.close)
        self._nursery.start_soon(self._prefetch_certificate, proxy.ctx)
        return proxy

    async def _prefetch_certificate(self, ctx: PodContext) -> None:
        """The pod's certificate, then the pooled connections its first connections are likely to need."""
        ref = ctx.pod
        try:
            svid = await self.certs.get(ref.identity)
            self.metrics.agent.set_certificate_expiry(str(ref.identity), svid.not_after)
        except Exception as exc:  # the first connection will ask again and report it
            log.warning("no certificate yet for %s: %s", ref.identity, exc)
            return
        try:
            await self.engine.call(outbound.prewarm, ctx)
        except Exception as exc:  # an optimisation: the first connection dials what was not pre-warmed
            log.warning("pre-warming pooled connections for %s failed: %s", ref.key, exc)

    def readiness(self) -> Readiness:
        if self.draining:
            return Readiness(False, "draining (the agent is stopping)")
        enroller = self.enroller
        return Readiness.from_checks({
            "discovery": self.synced,
            "enrollment": enroller is not None and not enroller.failures,
            "pod source": self.taking_pods,
        })

    async def drain(self, seconds: float) -> None:
        """Every pod's listeners closed and its HBONE clients sent elsewhere, then until its open
        connections have finished, for up to `seconds`; the pods keep their capture.  What is still open
        then is closed as the agent exits."""
        self.draining = True
        enrolled = self.enroller.enrolled.values() if self.enroller is not None else ()
        proxies = [handle for _, handle in enrolled if isinstance(handle, PodProxy)]
        started = trio.current_time()
        for proxy in proxies:
            await proxy.drain()
        left = 0
        with trio.move_on_after(seconds):
            while left := sum([await proxy.open_connections() for proxy in proxies]):
                await trio.sleep(DRAIN_POLL)
        log.info('{"event": "drained", "node": "%s", "pods": %d, "seconds": %.2f, "connections_left": %d}',
                 self._node, len(proxies), trio.current_time() - started, left)

    async def open_connections(self) -> int:
        """The connections the enrolled pods have open and the pooled HBONE connections (what the memory
        trimmer watches)."""
        enrolled = list(self.enroller.enrolled.values()) if self.enroller is not None else []
        pods = sum([await handle.open_connections() for _, handle in enrolled if isinstance(handle, PodProxy)])
        return pods + await self.engine.call(self._pooled)

    async def _pooled(self) -> int:  # on the engine, which changes the pool
        return self.pool.connection_count()

    def close_pods(self) -> None:
        """Let go of the pods' namespaces the pod source holds (their capture stays)."""
        if isinstance(self.pods, CniPodSource):
            self.pods.close()

    def enrollment(self) -> dict[str, Any]:
        enroller = self.enroller
        if enroller is None:
            return {}
        out: dict[str, Any] = {uid: "enrolled" for uid in enroller.enrolled}
        out.update({uid: f"failed: {why}" for uid, why in enroller.failures.items()})
        return out

    def capture(self) -> dict[str, Any]:
        """What of each enrolled pod's capture is in place (it asks the kernel: run it off the loop)."""
        redirector = self.parts.redirector
        pods = []
        for ref, _ in list(self.enroller.enrolled.values()) if self.enroller else []:
            try:
                found = redirector.verify(ref)
                pods.append({"pod": ref.key, "present": found.present, "exact": found.exact,
                             "detail": list(found.detail)})
            except (OSError, MeshError) as exc:
                pods.append({"pod": ref.key, "error": str(exc)})
        return {"mode": redirector.mode, "pods": pods}

    def report(self) -> None:
        """The gauges that are read, not counted: discovery connected, pods enrolled."""
        self.metrics.agent.set_xds_connected(self.xds.connected)
        if self.enroller is not None:
            self.metrics.agent.set_enrolled_pods(len(self.enroller.enrolled))
