"""The control plane, assembled: discovery and CA on one TLS gRPC port, the apply API, metrics.

Top to bottom (`ControlPlane.start`): metrics registry, configuration source (the store and its
translation; on Kubernetes the store is filled from the cluster's API, listed before anything is served,
and callers are authenticated by TokenReview), discovery server, the CA's server (`ca.server`: state
directory → CA → token issuer → service → TLS) with discovery added on the same port, HTTP endpoints
(metrics on TCP, debug on a Unix socket), the apply API (which also mints tokens with the CA's issuer and
takes the operator's CA requests, such as rotations; local source only) or, on Kubernetes, the admission
webhook, then `endpoints.json`; and a task that ticks the CA every `CA_TICK` seconds (root rotation
phases, the token key's scheduled rotation).
`stop` undoes it in reverse.  `run` is the process (until SIGTERM or SIGINT); `ControlPlaneThread` runs
it on an event loop of its own (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ca.auth import Authenticator
from ca.server import CAServer
from ca.tokenreview import TokenReviewAuthenticator
from controlplane.config.apiserver import ApiServer
from controlplane.config.kubernetes import KubernetesSource, api_client
from controlplane.config.store import Store
from controlplane.discovery.http import http_endpoints
from controlplane.discovery.pods import WorkloadPodLocator
from controlplane.discovery.server import DiscoveryServer, add_to_server
from controlplane.discovery.source import ResourceSource, TranslatedSource
from controlplane.metrics import ControlPlaneMetrics, log_event
from controlplane.options import ENDPOINTS_FILE, KUBERNETES, LOCAL, STORE_DIR, Options
from controlplane.translate.snapshot import translate_logged
from controlplane.webhook import WebhookServer
from mesh import defaults
from mesh.errors import MeshError
from mesh.files import write_atomic
from mesh.loopthread import LoopThread
from mesh.process import split_hostport
from mesh.serve.thread import ServerThread

log = logging.getLogger("controlplane")
T = TypeVar("T")
CA_TICK = 0.25  # seconds between two looks at the CA's schedule


class ControlPlaneError(MeshError):
    pass


@dataclass
class Running:
    """What a started control plane tells its caller."""

    grpc_port: int
    metrics_port: int
    root_pem: bytes | None
    discovery: DiscoveryServer
    extras: dict[str, Any] = field(default_factory=dict)


class ControlPlane:
    def __init__(self, opts: Options, source: ResourceSource | None = None) -> None:
        self.opts = opts
        self.source = source
        self.metrics = ControlPlaneMetrics()
        self.extras: dict[str, Any] = {}
        self.discovery: DiscoveryServer | None = None
        self.ca: CAServer | None = None
        self.http: ServerThread | None = None
        self.api: ApiServer | None = None
        self.kube: KubernetesSource | None = None
        self.webhook: WebhookServer | None = None
        self.ticker: asyncio.Task[None] | None = None

    async def start(self) -> Running:
        """Everything, in order; if a step fails, what was started is stopped again."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Running:
        opts, home, metrics = self.opts, self.opts.home, self.metrics
        home.mkdir(parents=True, exist_ok=True)

        # Configuration and discovery (and, on Kubernetes, who the callers are).
        authenticator: Authenticator | None = None
        if self.source is not None:
            source = self.source
        elif opts.config_source == KUBERNETES:
            source, authenticator = await self._kubernetes_source()
        else:
            source = self._store_source()
        self.discovery = discovery = DiscoveryServer(source, metrics, debounce=opts.debounce)
        await discovery.start()

        # One gRPC server for the CA and discovery.
        self.ca = ca = CAServer.from_state_dir(
            home, WorkloadPodLocator(discovery), trust_domain=opts.trust_domain, authenticator=authenticator,
            registry=metrics.registry, serving_hosts=opts.tls_hosts(), plaintext=opts.plaintext,
            token_ttl=datetime.timedelta(seconds=opts.token_ttl),
            token_key_rotation=datetime.timedelta(seconds=opts.token_key_rotation) if opts.token_key_rotation else None)
        discovery.authenticator = ca.service.authenticator  # one verifier for the CA and discovery
        add_to_server(ca.grpc, discovery)
        self.extras.update(authority=ca.authority, token_issuer=ca.issuer)
        grpc_port = await ca.start(opts.grpc_listen)
        self.ticker = asyncio.create_task(self._tick(ca), name="ca-tick")

        # HTTP: metrics (TCP) and debug (Unix socket).
        endpoints = http_endpoints(metrics.registry, discovery.connections, asyncio.get_running_loop())
        mhost, mport = split_hostport(opts.metrics_listen)
        self.http = ServerThread("controlplane-http").tcp(endpoints, mhost, mport, name="metrics")
        self.http.unix(endpoints, home / defaults.DEBUG_SOCKET, name="debug")
        metrics_port = int(self.http.start()[0])

        # The apply API, and the token minter (local source: on Kubernetes, kubectl writes the configuration).
        if opts.config_source == LOCAL and "store" in self.extras:
            self.api = ApiServer(self.extras["store"], home / defaults.API_SOCKET, on_request=self._record,
                                 tokens=ca.issuer, ca=ca)
            self.api.start()

        # The admission webhook (Kubernetes), with a serving certificate from the CA.
        serving: dict[str, Any] = {"pid": os.getpid(), "grpc": f"{split_hostport(opts.grpc_listen)[0]}:{grpc_port}",
                                   "metrics": f"{mhost}:{metrics_port}", "debug_socket": defaults.DEBUG_SOCKET}
        if opts.config_source == KUBERNETES:
            self.webhook = WebhookServer(ca.authority, opts.tls_hosts(), opts.webhook_listen)
            self.extras["webhook_port"] = webhook_port = int(self.webhook.start()[0])
            serving["webhook"] = f"{split_hostport(opts.webhook_listen)[0]}:{webhook_port}"

        write_atomic(home / ENDPOINTS_FILE, json.dumps(serving).encode())
        log_event("started", grpc_port=grpc_port, metrics_port=metrics_port, tls=not opts.plaintext,
                  version=discovery.version)
        return Running(grpc_port, metrics_port, ca.root_pem, discovery, self.extras)

    async def stop(self) -> None:
        log_event("stopping")
        home = self.opts.home
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.stop()
        if self.webhook is not None:
            with contextlib.suppress(Exception):
                self.webhook.stop()
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
        if self.discovery is not None:
            await self.discovery.stop()
        if self.kube is not None:
            await asyncio.to_thread(self.kube.stop)
        if self.ca is not None:
            await self.ca.stop(grace=1.0)
        if self.http is not None:
            self.http.stop()  # removes the debug socket
        (home / ENDPOINTS_FILE).unlink(missing_ok=True)

    @staticmethod
    async def _tick(ca: CAServer) -> None:
        """The CA's schedule: root rotation phases, the token key's rotation (file writes: off the loop)."""
        while True:
            await asyncio.sleep(CA_TICK)
            try:
                await asyncio.to_thread(ca.tick)
            except Exception:  # keep ticking: the next look may succeed (a full disk, say), and say so each time
                log.exception("the CA's scheduled work failed")

    def _store_source(self) -> ResourceSource:
        """The configuration store (under `controlplane/store/`) and its translation."""
        return self._translated(Store(self.opts.home / STORE_DIR))

    async def _kubernetes_source(self) -> tuple[ResourceSource, Authenticator]:
        """The cluster's objects in a store in memory (every collection listed before this returns) and its
        translation, and the TokenReview authenticator."""
        opts = self.opts
        api = api_client(opts.kubeconfig)
        self.kube = self.extras["kubernetes"] = KubernetesSource(api, Store(check_references=False))
        self.kube.start()
        await asyncio.to_thread(self.kube.wait_synced, opts.sync_timeout)
        authenticator = TokenReviewAuthenticator(api, trust_domain=opts.trust_domain,
                                                 node_agents=opts.node_agent_accounts)
        return self._translated(self.kube.store), authenticator

    def _translated(self, store: Store) -> ResourceSource:
        """`store`'s translation, with a log line and a count for every change."""
        self.extras["store"] = store
        metrics = self.metrics

        def on_change(event: Any) -> None:  # runs under the store's lock: record and return
            metrics.apply(True)
            log_event(
                "config_change",
                version=event.version,
                changed=sorted(_ref_name(r) for r in event.changed),
                removed=sorted(_ref_name(r) for r in event.removed),
            )

        store.subscribe(on_change)
        return TranslatedSource(store, functools.partial(translate_logged, trust_domain=self.opts.trust_domain))

    def _record(self, path: str, status: int, version: str | int, errors: int, ms: float) -> None:
        """One structured line per apply, delete or label, and the rejected-applies counter."""
        if path not in ("/apply", "/delete", "/label"):
            return
        accepted = status == 200
        if path == "/apply" and not accepted:
            self.metrics.apply(False)
        log_event("apply" if path == "/apply" else path.lstrip("/"), request=path, status=status,
                  accepted=accepted, version=version, errors=errors, ms=round(ms, 1))


def _ref_name(ref: Any) -> str:
    return "/".join(p for p in (getattr(ref, "kind", ""), getattr(ref, "namespace", ""), getattr(ref, "name", "")) if p)


async def serve(opts: Options, stop: asyncio.Event, source: ResourceSource | None = None) -> None:
    """The control plane until `stop` is set."""
    control_plane = ControlPlane(opts, source)
    await control_plane.start()
    try:
        await stop.wait()
    finally:
        await control_plane.stop()


def run(opts: Options) -> None:
    """The process: the control plane until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(opts, stop)

    asyncio.run(main())


class ControlPlaneThread:
    """The control plane on an event loop of its own, in a thread (tests, benchmarks, embedding)."""

    def __init__(self, opts: Options, source: ResourceSource | None = None) -> None:
        self.opts = opts
        self.source = source
        self.running: Running | None = None
        self._loop: LoopThread | None = None
        self._control_plane: ControlPlane | None = None

    def start(self, timeout: float = 30.0) -> Running:
        self._loop = LoopThread("controlplane")

        async def start() -> Running:
            self._control_plane = ControlPlane(self.opts, self.source)
            return await self._control_plane.start()

        try:
            self.running = self._loop.run(start(), timeout)
        except TimeoutError:
            self._loop.close()
            raise ControlPlaneError("control plane did not start in time") from None
        except BaseException:
            self._loop.close()
            raise
        return self.running

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._loop.closed:
            return
        try:
            if self._control_plane is not None:
                self._loop.run(self._control_plane.stop(), timeout)
        finally:
            self._loop.close(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn()` on the control plane's event loop and return its result (read state safely)."""
        assert self._loop is not None
        return self._loop.call(fn, timeout)
