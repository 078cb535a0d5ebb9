"""The scaffold of a data plane process (the node agent, a waypoint): what both do the same way, so that
each one's `app.py` shows only what is its own.

    flags         add_flags(parser, token_help=...), then flag_values(parser, args) -> ProcessOptions fields:
                  --control-plane --root-cert --token-file --trust-domain --cert-ttl --admin-listen
                  --metrics-listen --ready-listen --connect-timeout --log-level --otlp-endpoint
                  --otlp-ca --otlp-export-interval --trace-sampling
    process       run(opts, body, log, stopping): logging (`mesh.logs`), open-files limit, SIGTERM/SIGINT set `stop`;
                  cancelled_on_stop(serve) for a process with nothing to drain; freeze_heap(log) once
                  synced, so that the cyclic collector no longer walks what lives as long as the process
    certificates  open_certificates(opts, impersonate=...): token file, trust bundle file -> CA client ->
                  secret manager (running); both files are read again as they change
    discovery     open_discovery(opts, node, subscriptions, handler): the delta xDS client with the token,
                  its channel of accepted updates kept empty; wait_synced(xds, opts, log, on_wait)
    serving       start_serving(nursery, opts, registry=, ready=, admin=, reuse_port=): metrics, readiness
                  and admin endpoints (`mesh.serve`); their bound ports
    tracing       tracer(opts, resource, registry): the process's `Tracer`, with an OTLP exporter when
                  --otlp-endpoint (or $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set (https: --otlp-ca;
                  headers: $OTEL_EXPORTER_OTLP_[TRACES_]HEADERS, `mesh.tracing.collector`);
                  start_tracing(nursery, tracer) runs the exporter's background task, flush_tracing(tracer)
                  sends what is left (on a graceful stop, within a short deadline)
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from mesh import defaults, logs
from mesh.errors import MeshError
from mesh.process import raise_open_files_limit, serve_until_signalled, split_hostport
from mesh.secrets.bundle import TrustBundle
from mesh.secrets.client import CAClient
from mesh.secrets.manager import SecretManager
from mesh.serve.endpoints import Readiness, serve_metrics, serve_readiness
from mesh.serve.routes import Handler
from mesh.serve.server import serve_http
from mesh.tracing.collector import CERTIFICATE_ENV, HEADERS_ENV, Collector, OtlpEndpoint, env_value
from mesh.tracing.errors import TracingError
from mesh.tracing.exporter import ENDPOINT_ENV, INTERVAL, INTERVAL_ENV, SpanExporter
from mesh.tracing.sampler import DEFAULT_SAMPLING_PERCENT
from mesh.tracing.span import Resource
from mesh.tracing.tracer import Tracer
from mesh.xds.client import ClientConfig
from mesh.xds.node import NodeInfo
from mesh.xds.trio_client import TrioHandler, TrioXdsClient, open_xds_client

LOG_LEVELS = logs.LEVELS
EXPORT_INTERVAL = INTERVAL  # seconds between span exports
FLUSH_TIMEOUT = 1.0  # seconds a stopping process gives its last spans


@dataclass(frozen=True, kw_only=True)
class ProcessOptions:
    """What every data plane process is started with; a process's own `Options` adds to it."""

    control_plane: str  # HOST:PORT of discovery and the CA (TLS)
    root_cert: Path  # the mesh's root certificates (PEM; read again when it changes: root rotation)
    token_file: Path  # the token the control plane issued (read again on each use: it may be replaced)
    trust_domain: str = defaults.TRUST_DOMAIN
    cert_ttl: int = 0  # seconds; 0 = the CA's default
    admin_listen: str = defaults.ADMIN_LISTEN
    metrics_listen: str = defaults.METRICS_LISTEN
    ready_listen: str = defaults.READY_LISTEN
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    log_level: str = "info"
    otlp_endpoint: str = ""  # OTLP/HTTP traces URL; "" exports no spans (ids still propagate)
    otlp_ca: str = ""  # https collector: the CA file its certificate is checked against ("" the system's)
    otlp_export_interval: float = EXPORT_INTERVAL  # seconds between exports (a full batch goes at once)
    trace_sampling: float = DEFAULT_SAMPLING_PERCENT  # percent of new traces sampled, unless Telemetry says

    def token(self) -> str:
        return self.token_file.read_text().strip()


# ---- flags ------------------------------------------------------------------------------------------------


def add_flags(p: argparse.ArgumentParser, *, token_help: str) -> None:
    """The flags of `ProcessOptions` (the process adds its own before or after)."""
    d = ProcessOptions  # the defaults, written once
    p.add_argument("--control-plane", required=True, metavar="HOST:PORT", help="discovery and CA (TLS)")
    p.add_argument("--root-cert", required=True, type=Path, help="the mesh's root certificate (PEM)")
    p.add_argument("--token-file", required=True, type=Path, help=token_help)
    p.add_argument("--trust-domain", default=d.trust_domain)
    p.add_argument("--cert-ttl", type=int, default=d.cert_ttl, metavar="SECONDS", help="certificate lifetime to ask for")
    p.add_argument("--admin-listen", default=d.admin_listen, metavar="HOST:PORT")
    p.add_argument("--metrics-listen", default=d.metrics_listen, metavar="HOST:PORT")
    p.add_argument("--ready-listen", default=d.ready_listen, metavar="HOST:PORT")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout, metavar="SECONDS")
    p.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    p.add_argument("--otlp-endpoint", default=os.environ.get(ENDPOINT_ENV, ""), metavar="URL",
                   help="send spans over OTLP/HTTP to this collector URL, e.g. http://collector:4318/v1/traces "
                        f"(default: ${ENDPOINT_ENV}; unset: no spans are exported)")
    p.add_argument("--otlp-ca", default="", metavar="FILE",
                   help="for an https collector: the CA certificates (PEM) its certificate must chain to "
                        f"(default: ${CERTIFICATE_ENV[0]}, else ${CERTIFICATE_ENV[1]}, else the system's trust "
                        f"store); extra headers come from ${HEADERS_ENV[0]} or ${HEADERS_ENV[1]}")
    p.add_argument("--otlp-export-interval", type=float, default=None, metavar="SECONDS",
                   help=f"seconds between span exports (default: ${INTERVAL_ENV}, in milliseconds, else "
                        f"{d.otlp_export_interval:g})")
    p.add_argument("--trace-sampling", type=float, default=d.trace_sampling, metavar="PERCENT",
                   help="percentage of new traces this process samples when no Telemetry resource sets it "
                        "(default %(default)s, as Istio)")


def flag_values(p: argparse.ArgumentParser, args: argparse.Namespace, *,
                listen: Sequence[str] = ()) -> dict[str, Any]:
    """The `ProcessOptions` fields from parsed flags, checked (`p.error` exits with the reason).  `listen`
    names the process's own HOST:PORT flags to check with the shared ones."""
    for path, what in ((args.root_cert, "--root-cert"), (args.token_file, "--token-file")):
        if not path.is_file():
            p.error(f"{what} {path}: no such file")
    for flag in ("admin_listen", "metrics_listen", "ready_listen", *listen):
        try:
            split_hostport(getattr(args, flag))
        except MeshError as exc:
            p.error(f"--{flag.replace('_', '-')}: {exc}")
    ca = args.otlp_ca
    if args.otlp_endpoint:
        try:
            if not ca and OtlpEndpoint.parse(args.otlp_endpoint).tls:
                ca = env_value(CERTIFICATE_ENV)  # OpenTelemetry's variables: for an https collector only
            collector(args.otlp_endpoint, ca)
        except TracingError as exc:
            p.error(f"--otlp-endpoint: {exc}")
    elif ca:
        p.error(f"--otlp-ca {args.otlp_ca}: there is no --otlp-endpoint to use it for")
    interval = args.otlp_export_interval
    if interval is None:
        raw = os.environ.get(INTERVAL_ENV, "").strip()
        try:
            interval = float(raw) / 1000.0 if raw else ProcessOptions.otlp_export_interval
        except ValueError:
            p.error(f"${INTERVAL_ENV} {raw!r}: give the milliseconds between span exports, e.g. 1000")
    if not interval > 0:
        p.error(f"--otlp-export-interval {interval:g}: give a number of seconds above 0")
    if not 0.0 <= args.trace_sampling <= 100.0:
        p.error(f"--trace-sampling {args.trace_sampling:g}: give a percentage from 0 to 100")
    return {"control_plane": args.control_plane, "root_cert": args.root_cert, "token_file": args.token_file,
            "trust_domain": args.trust_domain, "cert_ttl": args.cert_ttl, "admin_listen": args.admin_listen,
            "metrics_listen": args.metrics_listen, "ready_listen": args.ready_listen,
            "connect_timeout": args.connect_timeout, "log_level": args.log_level,
            "otlp_endpoint": args.otlp_endpoint, "otlp_ca": ca, "otlp_export_interval": interval,
            "trace_sampling": args.trace_sampling}


# ---- the process ------------------------------------------------------------------------------------------


def run(opts: ProcessOptions, body: Callable[[trio.Event], Awaitable[None]], log: logging.Logger,
        stopping: str) -> int:
    """Run `body(stop)` as the process: logging on stdout, the whole open-files limit, and SIGTERM or
    SIGINT setting `stop` (logged as `stopping`).  The exit status.  The format is `mesh.logs`'s; the
    admin endpoint's `/logging` changes the levels while the process runs."""
    logs.configure(opts.log_level)
    raise_open_files_limit()
    return serve_until_signalled(body, log, stopping)


def freeze_heap(log: logging.Logger) -> None:
    """Keep what the process has built so far (its modules, its configuration, the first discovery state)
    out of the cyclic collector's passes.  A full pass walks every tracked object with the GIL held, and
    no connection moves meanwhile: 25-45 ms in a node agent, which made its p99 for new connections 40 ms.
    Called once, when discovery has synced and before the data path carries connections; the cyclic
    garbage of the start is collected first.  Frozen objects are still freed when their last reference
    goes; only a cycle among them would stay, and they are what the process keeps for its life."""
    collected = gc.collect()
    gc.freeze()
    log.info('{"event": "heap_frozen", "objects": %d, "collected": %d}', gc.get_freeze_count(), collected)


def cancelled_on_stop(serve: Callable[[], Awaitable[None]]) -> Callable[[trio.Event], Awaitable[None]]:
    """A body for `run` that serves until `stop` is set and is then cancelled (nothing to drain)."""

    async def body(stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await stop.wait()
            nursery.cancel_scope.cancel()

    return body


# ---- certificates -----------------------------------------------------------------------------------------


@asynccontextmanager
async def open_certificates(opts: ProcessOptions, *, impersonate: bool) -> AsyncIterator[SecretManager]:
    """The secret manager, running: it asks the CA with the token in `opts.token_file` (`impersonate`:
    on behalf of the pods of its node, as a node agent does; else for its own identity), trusting the
    roots in `opts.root_cert`, followed as the file changes (a root rotation: no restart)."""
    bundle = TrustBundle.from_file(opts.root_cert)
    with CAClient(opts.control_plane, bundle.pem, opts.token) as signer:
        certs = SecretManager(signer, bundle, impersonate=impersonate, ttl_seconds=opts.cert_ttl)
        async with trio.open_nursery() as nursery:
            await nursery.start(certs.run)
            yield certs
            nursery.cancel_scope.cancel()


# ---- discovery --------------------------------------------------------------------------------------------


@asynccontextmanager
async def open_discovery(opts: ProcessOptions, node: NodeInfo, subscriptions: Mapping[str, Sequence[str] | None],
                         handler: TrioHandler) -> AsyncIterator[TrioXdsClient]:
    """The discovery client, feeding `handler` (the process's only writer of its configuration; raising
    NACKs).  Accepted updates are also offered on a channel: it is kept empty here, or the client would
    stop acknowledging."""
    opts.token()  # readable now, or fail here saying so
    bundle = TrustBundle.from_file(opts.root_cert)
    config = ClientConfig(target=opts.control_plane, node=node, subscriptions=subscriptions,
                          root_pem=bundle.pem(), root_pem_fn=bundle.pem,  # both read per stream
                          metadata_fn=lambda: (("authorization", f"Bearer {opts.token()}"),))
    async with open_xds_client(config, handler=handler) as xds, trio.open_nursery() as nursery:
        nursery.start_soon(_drain, xds)
        yield xds
        nursery.cancel_scope.cancel()


async def _drain(xds: TrioXdsClient) -> None:
    async for _ in xds.updates:
        pass


async def wait_synced(xds: TrioXdsClient, opts: ProcessOptions, log: logging.Logger,
                      on_wait: Callable[[], None] | None = None, *, every: float = 5.0) -> None:
    """Until discovery has delivered a first complete configuration; while waiting, a line in the log
    and `on_wait()` every `every` seconds."""
    while not await xds.wait_synced(timeout=every):
        log.info('{"event": "waiting for discovery", "control_plane": "%s"}', opts.control_plane)
        if on_wait is not None:
            on_wait()


# ---- serving ----------------------------------------------------------------------------------------------


async def start_serving(nursery: trio.Nursery, opts: ProcessOptions, *, registry: CollectorRegistry,
                        ready: Callable[[], Readiness], admin: Handler, reuse_port: bool = False) -> dict[str, int]:
    """The metrics, readiness and admin endpoints, started in `nursery`; their bound ports by name.  With
    `reuse_port` a successor started beside this process takes the endpoints over as soon as it listens
    (`mesh.reuseport`), so that its readiness is what a probe sees."""
    ports: dict[str, int] = {}
    host, port = split_hostport(opts.metrics_listen)
    ports["metrics"] = await nursery.start(functools.partial(serve_metrics, registry, host=host, port=port,
                                                             reuse_port=reuse_port))
    host, port = split_hostport(opts.ready_listen)
    ports["ready"] = await nursery.start(functools.partial(serve_readiness, ready, host=host, port=port,
                                                           reuse_port=reuse_port))
    host, port = split_hostport(opts.admin_listen)
    # The admin's answers may ask the kernel (a pod's capture): they run off the event loop.
    ports["admin"] = await nursery.start(functools.partial(serve_http, admin, host, port, name="admin",
                                                           in_thread=True, reuse_port=reuse_port))
    return ports


# ---- tracing ----------------------------------------------------------------------------------------------


def tracer(opts: ProcessOptions, resource: Resource, registry: CollectorRegistry) -> Tracer:
    """The process's tracer: exporting to `opts.otlp_endpoint` when set (the exporter's counters on
    `registry`), else propagating ids only.  No I/O: `start_tracing` runs the exporter."""
    exporter = None
    if opts.otlp_endpoint:
        exporter = SpanExporter(collector(opts.otlp_endpoint, opts.otlp_ca), resource, registry,
                                interval=opts.otlp_export_interval)
    return Tracer(exporter, sampling=opts.trace_sampling)


def collector(url: str, ca_file: str = "", environ: Mapping[str, str] = os.environ) -> Collector:
    """The collector at `url`, with the CA file and the headers OpenTelemetry's variables give;
    `TracingError` saying what is wrong."""
    headers_var = next((n for n in HEADERS_ENV if environ.get(n, "").strip()), HEADERS_ENV[0])
    return Collector.configure(url, ca_file=ca_file, headers=env_value(HEADERS_ENV, environ),
                               headers_where=f"${headers_var}")


async def start_tracing(nursery: trio.Nursery, tracer: Tracer) -> None:
    """The exporter's background task, started in `nursery` (nothing when the tracer does not export)."""
    if isinstance(tracer.exporter, SpanExporter):
        await nursery.start(tracer.exporter.run)


async def flush_tracing(tracer: Tracer, timeout: float = FLUSH_TIMEOUT) -> None:
    """Send the spans still queued, within `timeout` (a process that stops: what is left then is lost)."""
    if isinstance(tracer.exporter, SpanExporter):
        with trio.move_on_after(timeout):
            await tracer.exporter.flush()
