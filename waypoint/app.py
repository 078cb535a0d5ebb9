"""The waypoint, assembled: the one place that shows how its parts fit, top to bottom.

    discovery (Workloads, Services, L7Configs naming it) ──> WaypointConfig ──> RouteTable ──> proxy
    :15008 HBONE inbound (mTLS, own certificate) ──> admit CONNECT ──> WaypointProxy.serve_tunnel
                                                        │ HTTP: route, authn, authz, faults, retries
                                                        │ other: L4 policy, passthrough
                                                        └──> HboneUpstream: HBONE pool (own certificate)
                                                             to endpoints' 15008, plain TCP outside the mesh
    certificate (CA, own identity)   metrics :15020   readiness :15021   admin 127.0.0.1:15000
    spans (one per request, `waypoint.tracing`) ──> OTLP exporter (--otlp-endpoint), in the background

`serve` reads in order: certificates (the CA, with a workload token for its own identity), the waypoint's
parts, discovery feeding its configuration, then `Waypoint.run`: the serving endpoints and the HBONE
listener.  It serves until `stop` is set, then drains within `drain_seconds`: readiness turns 503, it
serves as before until no tunnel has been open for `QUIET_SECONDS` (the node agents, told the waypoint is
going, no longer send here), and only then sends GOAWAY on every HBONE connection and closes its
listener; tunnels still in flight finish by the deadline.  From the start of the drain, the clients
inside the tunnels are asked to move as Envoy's drain asks them (`WaypointProxy.drain`): HTTP/1.1
responses say `Connection: close` and end their connection, HTTP/2 connections get GOAWAY, so keep-alive
clients open their next connection (and the node agent its next tunnel) before the deadline cuts them.  (A GOAWAY sent while agents still open tunnels
refuses the streams it has not read yet, and a closed listener resets connections in its backlog: both
failed requests when the waypoint went under load.)  `run` is the process
(`mesh.runtime`).

Gateway mode (`Options.listeners`, an ingress Gateway's pod): the same parts, but the Gateway's listeners
(`waypoint.gateway.IngressListeners`) in place of the HBONE inbound, a table compiled for the gateway
(routes by host), and an upstream that goes through a service's waypoint when it has one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from mesh import runtime
from mesh.hbone.aiopool import AioPool
from mesh.hbone.aiopool import tcp_connect as aio_connect
from mesh.hbone.engine import Engine, EngineError
from mesh.hbone.pool import HbonePool, tcp_connect
from mesh.process import split_hostport
from mesh.secrets.errors import SecretsError
from mesh.secrets.manager import SecretManager
from mesh.serve.endpoints import Readiness
from mesh.tracing.span import Resource
from mesh.xds.trio_client import TrioXdsClient
from waypoint.admin import AdminView, ProcessMetrics
from waypoint.config import RouteTable
from waypoint.discovery import SUBSCRIPTIONS, WaypointConfig
from waypoint.engine.hop import EngineHop, EngineProxy, TracerOnTrio, TunnelPool, admitted
from waypoint.engine.inbound import EngineInbound, engine_line
from waypoint.gateway import IngressListeners, ViaWaypoint, refuse_l4
from waypoint.inbound import InboundServer, stdout_line
from waypoint.metrics import WaypointMetrics
from waypoint.options import Options
from waypoint.proxy import WaypointProxy
from waypoint.upstream.connect import HboneUpstream

log = logging.getLogger("waypoint")

QUIET_SECONDS = 0.5  # draining: the listener closes once no tunnel has been open this long (or at the deadline)


def run(opts: Options) -> int:
    """The process, until SIGTERM or SIGINT and the drain; the exit status."""
    logging.getLogger("waypoint.access").propagate = False  # access lines go to stdout as bare JSON
    return runtime.run(opts, functools.partial(serve, opts), log, f'{{"event": "stopping", "waypoint": "{opts.key}"}}')


async def serve(opts: Options, stop: trio.Event) -> None:
    """The waypoint, until `stop` is set and it has drained."""
    async with runtime.open_certificates(opts, impersonate=False) as certs:
        waypoint = Waypoint(opts, certs)
        async with runtime.open_discovery(opts, opts.node_info(), SUBSCRIPTIONS, waypoint.config.handle) as xds:
            await waypoint.run(xds, stop)


class Waypoint:
    def __init__(self, opts: Options, certs: SecretManager, registry: CollectorRegistry | None = None) -> None:
        self.opts = opts
        self.identity = opts.identity
        self.certs = certs
        self.registry = registry or CollectorRegistry()
        self.pool = HbonePool(tcp_connect, certs.client_context, connect_timeout=opts.connect_timeout,
                              certificate=certs.current)
        upstream = HboneUpstream(self.pool, self.identity, trust_domain=opts.trust_domain,
                                 connect_timeout=opts.connect_timeout)
        self.tracer = runtime.tracer(opts, Resource.of({
            "service.name": f"{opts.name}.{opts.namespace}", "service.instance.id": opts.key,
            "k8s.namespace.name": opts.namespace, "k8s.node.name": opts.node, "istio.proxy": "waypoint"}),
            self.registry)
        # gateway mode: requests for a service with a waypoint go through that waypoint
        self.via = ViaWaypoint(upstream) if opts.ingress else None
        self.proxy = WaypointProxy(self.via or upstream, metrics=WaypointMetrics(self.registry), access_log=stdout_line,
                                   identity=str(self.identity), tracer=self.tracer)
        self.config = WaypointConfig(opts.key, self._use_table, allow_http_jwks=opts.allow_http_jwks,
                                     ingress=opts.ingress)
        self.inbound: InboundServer | EngineInbound = InboundServer(
            self.proxy, certs, self.identity, trust_domain=opts.trust_domain, limits=opts.hbone_limits,
            config=opts.hbone_config, reuse_port=opts.workers > 1)  # 15008 shared by the workers
        self.proxy.l4_handler = refuse_l4 if opts.ingress else self.inbound.l4
        # the data path on the engine (uvloop in its own thread), what it hands over served by `proxy`
        self.engine = Engine("waypoint-data-path") if opts.engine == "uvloop" and not opts.ingress else None
        self.engine_proxy = EngineProxy(self.proxy, tracer=TracerOnTrio(self.tracer, self.engine),
                                        access_log=engine_line) if self.engine is not None else None
        self.engine_pool: AioPool | None = None
        self.hop: EngineHop | None = None
        self._engine_running = False
        self.listeners = (IngressListeners(self.proxy, list(opts.listeners), reuse_port=opts.workers > 1)
                          if opts.ingress else None)
        self.synced = False
        self.draining = False
        self.xds: TrioXdsClient | None = None
        self.ports: dict[str, int] = {}
        ProcessMetrics(self.registry, connected=lambda: self.xds is not None and self.xds.connected,
                       config_version=lambda: self.config.version, certificate_expiry=self._expiry,
                       tunnels=lambda: self.inbound.tunnels,
                       inbound_connections=lambda: len(self.inbound.connections),
                       upstream_connections=self._upstream_connections)

    def _use_table(self, table: RouteTable) -> None:
        if self.via is not None:
            self.via.use(table)
        self.proxy.update(table)
        if self.engine_proxy is not None:
            if self._engine_running:
                assert self.engine is not None
                with contextlib.suppress(EngineError):  # (stopped: nothing is served any more)
                    self.engine.call_soon(self.engine_proxy.update, table)
            else:  # (nothing runs on the engine yet)
                self.engine_proxy.update(table)

    def _upstream_connections(self) -> int:
        return self.pool.connection_count() + (self.engine_pool.connection_count() if self.engine_pool else 0)

    # ---- what the endpoints read --------------------------------------------------------------------

    def _expiry(self) -> float:
        svid = self.certs.current(self.identity)
        return svid.leaf.not_valid_after_utc.timestamp() if svid else 0.0

    def readiness(self) -> Readiness:
        if self.draining:
            return Readiness(False, "draining")
        return Readiness.from_checks({"discovery": self.synced,
                                      "certificate": self.certs.current(self.identity) is not None})

    def config_dump(self) -> dict[str, Any]:
        return {"identity": str(self.identity), "synced": self.synced, **self.config.summary()}

    def stats(self) -> dict[str, Any]:
        return {"tunnels": self.inbound.tunnels, "inbound_connections": len(self.inbound.connections),
                "refused_tunnels": self.inbound.refused, "upstream_connections": self._upstream_connections(),
                "idle_upstream_http_connections": self.proxy.pool.idle_count() + (self.hop.pool.idle_count()
                                                                                   if self.hop else 0),
                "draining": self.draining, "engine": self.opts.engine if self.engine is not None else "trio",
                "handed_to_trio": self.hop.handed if self.hop else 0}  # (connections the engine's hop handed over)

    # ---- running --------------------------------------------------------------------------------------

    async def run(self, xds: TrioXdsClient, stop: trio.Event, *,
                  task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop` is set, then drain and return.  Reports the bound ports."""
        opts = self.opts
        self.xds = xds
        async with trio.open_nursery() as nursery:
            if self.engine is not None:
                await self._start_engine(nursery, self.engine)
            await nursery.start(self.pool.run)
            await nursery.start(self.proxy.run)  # JWKS fetched and refreshed in the background
            await runtime.start_tracing(nursery, self.tracer)  # spans sent in the background
            nursery.start_soon(self._keep_certificate)
            admin = AdminView(self.config_dump, self.certs.status, self.stats, name=opts.key)
            self.ports.update(await runtime.start_serving(nursery, opts, registry=self.registry,
                                                          ready=self.readiness, admin=admin.handle))
            if self.listeners is not None:  # gateway mode: the Gateway's listeners, no HBONE inbound
                await self._run_gateway(nursery, self.listeners, xds, stop, task_status)
            else:
                await self._run_waypoint(nursery, xds, stop, task_status)
        await self.proxy.pool.aclose()

    async def _start_engine(self, nursery: trio.Nursery, engine: Engine) -> None:
        """The engine's thread, its hop (over its own HBONE pool) and its inbound in place of trio's."""
        opts = self.opts
        await nursery.start(engine.run)
        assert self.engine_proxy is not None
        self.engine_pool = AioPool(aio_connect, self.certs.client_context, connect_timeout=opts.connect_timeout,
                                   certificate=self.certs.current)
        hop = self.hop = EngineHop(self.engine_proxy, engine.loop, admitted)
        hop.pool = TunnelPool(hop, self.engine_pool, self.identity, trust_domain=opts.trust_domain)
        self.inbound = EngineInbound(self.proxy, hop, engine, self.certs, self.identity,
                                     trust_domain=opts.trust_domain, limits=opts.hbone_limits,
                                     config=opts.hbone_config, reuse_port=opts.workers > 1)
        self._engine_running = True
        engine.call_soon(self.engine_proxy.update, self.proxy.table)  # (the newest, whatever came meanwhile)

    async def _run_waypoint(self, nursery: trio.Nursery, xds: TrioXdsClient, stop: trio.Event,
                            task_status: trio.TaskStatus[dict[str, int]]) -> None:
        """The HBONE inbound until `stop`, then the drain (see the module docstring)."""
        opts = self.opts
        host, port = split_hostport(opts.listen)
        inbound_done = trio.Event()

        async def serve_inbound(task_status: trio.TaskStatus[int]) -> None:
            try:
                await self.inbound.serve(host, port, task_status=task_status)
            finally:
                inbound_done.set()

        self.ports["hbone"] = await nursery.start(serve_inbound)
        log.info('{"event": "listening", "waypoint": "%s", "identity": "%s", "hbone": %d}',
                 opts.key, self.identity, self.ports["hbone"])
        task_status.started(dict(self.ports))
        nursery.start_soon(self._wait_synced, xds)
        await stop.wait()
        self.draining = True
        self.proxy.drain()  # keep-alive clients: `Connection: close` (HTTP/1.1), GOAWAY (HTTP/2)
        if self.engine is not None and self.hop is not None:
            self.engine.call_soon(self.hop.drain)
        log.info('{"event": "draining", "waypoint": "%s", "tunnels": %d}', opts.key, self.inbound.tunnels)
        deadline = trio.current_time() + opts.drain_seconds
        with trio.move_on_at(deadline):  # serving as before while the node agents stop sending here
            await self._quiet()
        self.inbound.drain()  # then GOAWAY and the listener closes
        with trio.move_on_at(deadline):
            await inbound_done.wait()
        log.info('{"event": "drained", "waypoint": "%s", "tunnels": %d}', opts.key, self.inbound.tunnels)
        await runtime.flush_tracing(self.tracer)  # the last requests' spans
        nursery.cancel_scope.cancel()

    async def _run_gateway(self, nursery: trio.Nursery, listeners: IngressListeners, xds: TrioXdsClient,
                           stop: trio.Event, task_status: trio.TaskStatus[dict[str, int]]) -> None:
        """Gateway mode: serve the listeners until `stop`, then readiness 503, the clients asked to move
        (`WaypointProxy.drain`) and the connections in flight given `drain_seconds` to finish."""
        opts = self.opts
        ports = await nursery.start(listeners.serve)
        self.ports.update(ports)
        log.info('{"event": "listening", "gateway": "%s", "identity": "%s", "listeners": "%s"}', opts.key,
                 self.identity, ",".join(f"{name}:{port}" for name, port in sorted(ports.items())))
        task_status.started(dict(self.ports))
        nursery.start_soon(self._wait_synced, xds)
        await stop.wait()
        self.draining = True
        self.proxy.drain()  # keep-alive clients move to a new connection (`Connection: close`, GOAWAY)
        with trio.move_on_after(opts.drain_seconds):
            while listeners.connections:
                await trio.sleep(QUIET_SECONDS / 10)
        await runtime.flush_tracing(self.tracer)
        nursery.cancel_scope.cancel()

    async def _quiet(self) -> None:
        """Until no tunnel has been open for `QUIET_SECONDS`: the node agents no longer send here."""
        quiet_since = trio.current_time()
        while trio.current_time() - quiet_since < QUIET_SECONDS:
            if self.inbound.tunnels:
                quiet_since = trio.current_time()
            await trio.sleep(QUIET_SECONDS / 10)

    async def _wait_synced(self, xds: TrioXdsClient) -> None:
        await runtime.wait_synced(xds, self.opts, log)
        runtime.freeze_heap(log)  # the node agents send here once it is ready, which it is from now on
        self.synced = True
        log.info('{"event": "synced", "waypoint": "%s", "version": %d, "services": %d}', self.opts.key,
                 self.config.version, len(self.proxy.table.services))

    async def _keep_certificate(self) -> None:
        """The first certificate, asked again with backoff until the CA gives it (then renewed by the
        secret manager)."""
        delay = 0.5
        while True:
            try:
                svid = await self.certs.get(self.identity)
            except SecretsError as exc:
                log.warning("no certificate for %s yet (%s); asking again in %.1fs", self.identity, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info('{"event": "certificate", "identity": "%s", "expires_in": %d}', self.identity,
                     svid.leaf.not_valid_after_utc.timestamp() - time.time())
            return
