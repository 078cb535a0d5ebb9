"""The node agent, assembled: the one place that shows how its parts fit, top to bottom.

    state (fed by discovery) ──> enroller ──> PodProxy per enrolled pod (15001, 15006, 15008 in the pod)
                                                 │ outbound ──> HBONE pool (connections from the pod)
                                                 │ inbound  ──> authorization ──> the application
    certificates (CA, on behalf of the node's pods)   metrics :15020   readiness :15021   admin :15000
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry

from mesh.hbone.pool import HbonePool
from mesh.process import split_hostport
from mesh.secrets.manager import SecretManager
from mesh.xds.trio_client import TrioXdsClient
from nodeagent.accesslog import AccessLog
from nodeagent.admin import Readiness, serve_admin, serve_metrics, serve_readiness
from nodeagent.enroll import Enroller
from nodeagent.metrics import NodeAgentMetrics
from nodeagent.pods.local import LocalPodSource
from nodeagent.pods.source import PodRef
from nodeagent.proxy.context import AgentParts, PodContext, pool_connect
from nodeagent.proxy.pod import PodProxy
from nodeagent.redirect.iptables import IptablesRedirector
from nodeagent.state import MeshState

if TYPE_CHECKING:
    from nodeagent.main import Options

log = logging.getLogger("nodeagent")


class Agent:
    def __init__(self, opts: Options, state: MeshState, certs: SecretManager, registry: CollectorRegistry,
                 xds: TrioXdsClient) -> None:
        self.opts = opts
        self.state = state
        self.certs = certs
        self.xds = xds
        self.metrics = NodeAgentMetrics.create(registry)
        self.pool = HbonePool(pool_connect(opts.connect_timeout), certs.client_context,
                              connect_timeout=opts.connect_timeout)
        self.parts = AgentParts(state=state, certs=certs, pool=self.pool, metrics=self.metrics,
                                log=AccessLog(sys.stdout), trust_domain=opts.trust_domain,
                                connect_timeout=opts.connect_timeout, redirector=IptablesRedirector())
        self.enroller: Enroller | None = None
        self._nursery: trio.Nursery | None = None
        self.synced = False

    async def start_pod(self, ref: PodRef) -> PodProxy:
        assert self._nursery is not None
        proxy = await PodProxy(PodContext(ref, self.parts)).start(self._nursery)
        self._nursery.start_soon(self._prefetch_certificate, ref)
        return proxy

    async def _prefetch_certificate(self, ref: PodRef) -> None:
        try:
            svid = await self.certs.get(ref.identity)
            self.metrics.agent.set_certificate_expiry(str(ref.identity), svid.not_after)
        except Exception as exc:  # the first connection will ask again and report it
            log.warning("no certificate yet for %s: %s", ref.identity, exc)

    def readiness(self) -> Readiness:
        enroller = self.enroller
        return Readiness.from_checks({
            "discovery": self.synced,
            "enrollment": enroller is not None and not enroller.failures,
        })

    def enrollment(self) -> dict[str, Any]:
        enroller = self.enroller
        if enroller is None:
            return {}
        out: dict[str, Any] = {uid: "enrolled" for uid in enroller.enrolled}
        out.update({uid: f"failed: {why}" for uid, why in enroller.failures.items()})
        return out

    async def serve(self, nursery: trio.Nursery) -> None:
        """Run until cancelled."""
        self._nursery = nursery
        opts = self.opts
        await nursery.start(self.pool.run)
        nursery.start_soon(self._drain_updates)
        metrics_host, metrics_port = split_hostport(opts.metrics_listen)
        await nursery.start(functools.partial(serve_metrics, self.metrics.registry, host=metrics_host,
                                              port=metrics_port))
        ready_host, ready_port = split_hostport(opts.ready_listen)
        await nursery.start(functools.partial(serve_readiness, self.readiness, host=ready_host, port=ready_port))
        admin_host, admin_port = split_hostport(opts.admin_listen)
        await nursery.start(functools.partial(serve_admin, self.state, self.certs.status, node=opts.node,
                                              enrollment=self.enrollment, host=admin_host, port=admin_port))
        log.info('{"event": "waiting for discovery", "control_plane": "%s"}', opts.control_plane)
        while not await self.xds.wait_synced(timeout=5.0):
            self.metrics.agent.set_xds_connected(self.xds.connected)
        self.synced = True
        self.metrics.agent.set_xds_connected(True)
        pods = LocalPodSource(self.state, opts.node, opts.pod_netns)
        self.enroller = Enroller(pods, self.parts.redirector, self.start_pod)
        await nursery.start(self.enroller.run)
        log.info('{"event": "ready", "node": "%s", "enrolled": %d}', opts.node, len(self.enroller.enrolled))
        while True:
            await trio.sleep(1.0)
            self.metrics.agent.set_xds_connected(self.xds.connected)
            self.metrics.agent.set_enrolled_pods(len(self.enroller.enrolled))

    async def _drain_updates(self) -> None:
        """Accepted updates are also offered on a channel (the state has them already): keep it empty,
        or the discovery client would stop acknowledging."""
        async for _ in self.xds.updates:
            pass
