"""The control plane process: discovery and CA on one TLS gRPC port, the apply API, metrics.

    python -m controlplane.main --state-dir DIR [--grpc-listen 0.0.0.0:15012]
        [--metrics-listen 0.0.0.0:15014] [--trust-domain cluster.local] [--serving-host NAME ...]

DIR is the cluster's state directory; the control plane keeps everything under `DIR/controlplane/`:

    ca/                  the CA's root and signing key (generated on first start; see `ca.authority`);
                         clients trust `ca/root-cert.pem`
    node-token-key.pem   the key node tokens are signed with (`ca.auth.NodeTokenIssuer`)
    api.sock             the apply API (the config store's server)
    debug.sock           local-only HTTP: /debug/connections (what `meshctl proxy-status` reads), /metrics
    endpoints.json       written once serving: {"pid", "grpc", "metrics", "version"} with the real ports

Assembly, top to bottom (`serve`): metrics registry, CA, configuration source, discovery server, one
grpc.aio server (TLS) hosting both services, HTTP endpoints, apply API; then wait for SIGTERM/SIGINT and
shut down in the reverse order.  `--plaintext` serves gRPC without TLS (debugging only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.metrics import CAMetrics
from ca.service import AsyncCertificateServicer, CertificateService
from ca.service import add_to_server as add_ca
from ca.serving import server_credentials
from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from controlplane.discovery.http import DebugHttp
from controlplane.discovery.pods import WorkloadPodLocator
from controlplane.discovery.server import DiscoveryServer, add_to_server
from controlplane.discovery.source import ResourceSource, TranslatedSource
from controlplane.metrics import ControlPlaneMetrics, log_event
from controlplane.translate.snapshot import translate
from mesh.errors import MeshError
from mesh.files import write_atomic
from mesh.process import split_hostport

log = logging.getLogger("controlplane")
T = TypeVar("T")

SUBDIR = "controlplane"
CA_SUBDIR = "ca"
TOKEN_KEY_FILE = "node-token-key.pem"
DEBUG_SOCKET = "debug.sock"
API_SOCKET = "api.sock"
ENDPOINTS_FILE = "endpoints.json"
STORE_SUBDIR = "store"

# The CA's receive limit cuts off oversized certificate requests; discovery responses may be large.
GRPC_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


class ControlPlaneError(MeshError):
    pass


@dataclass
class Options:
    state_dir: Path
    grpc_listen: str = "0.0.0.0:15012"
    metrics_listen: str = "0.0.0.0:15014"
    trust_domain: str = "cluster.local"
    serving_hosts: list[str] = field(default_factory=list)
    plaintext: bool = False
    debounce: float = 0.0

    @property
    def home(self) -> Path:
        return self.state_dir / SUBDIR


@dataclass
class Running:
    """What a started control plane tells its caller."""

    grpc_port: int
    metrics_port: int
    root_pem: bytes | None
    discovery: DiscoveryServer
    extras: dict[str, Any] = field(default_factory=dict)


def _serving_hosts(opts: Options) -> list[str]:
    host, _ = split_hostport(opts.grpc_listen)
    hosts = list(opts.serving_hosts) or ["localhost", "127.0.0.1"]
    if host not in ("0.0.0.0", "::") and host not in hosts:
        hosts.append(host)
    return hosts


def _make_source(opts: Options, metrics: ControlPlaneMetrics, extras: dict[str, Any]) -> ResourceSource:
    """The configuration store (state under `controlplane/config/store/`) and its translation."""
    store = Store(opts.home / STORE_SUBDIR)
    extras["store"] = store

    def on_change(event: Any) -> None:  # runs under the store's lock: record and return
        metrics.apply(True)
        log_event(
            "config_change",
            version=event.version,
            changed=sorted(_ref_name(r) for r in event.changed),
            removed=sorted(_ref_name(r) for r in event.removed),
        )

    store.subscribe(on_change)
    return TranslatedSource(store, functools.partial(translate, trust_domain=opts.trust_domain))


def _start_api(home: Path, extras: dict[str, Any], metrics: ControlPlaneMetrics) -> ApiServer | None:
    store = extras.get("store")
    if store is None:
        return None

    def record(path: str, status: int, version: str | int, errors: int, ms: float) -> None:
        """One structured line per apply, delete or label, and the rejected-applies counter."""
        if path not in ("/apply", "/delete", "/label"):
            return
        accepted = status == 200
        if path == "/apply" and not accepted:
            metrics.apply(False)
        log_event("apply" if path == "/apply" else path.lstrip("/"), request=path, status=status,
                  accepted=accepted, version=version, errors=errors, ms=round(ms, 1))

    api = ApiServer(store, home / API_SOCKET, on_request=record)
    api.start()
    return api


def _ref_name(ref: Any) -> str:
    return "/".join(p for p in (getattr(ref, "kind", ""), getattr(ref, "namespace", ""), getattr(ref, "name", "")) if p)


async def serve(
    opts: Options,
    source: ResourceSource | None = None,
    *,
    ready: Callable[[Running], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    home = opts.home
    home.mkdir(parents=True, exist_ok=True)
    stop = stop or asyncio.Event()
    metrics = ControlPlaneMetrics()
    extras: dict[str, Any] = {}

    # Configuration and discovery.
    if source is None:
        source = _make_source(opts, metrics, extras)
    discovery = DiscoveryServer(source, metrics, debounce=opts.debounce)
    await discovery.start()

    # One gRPC server for discovery and the CA.
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_to_server(server, discovery)
    root_pem: bytes | None = None
    creds = None
    authority = CertificateAuthority.load_or_create(home / CA_SUBDIR, trust_domain=opts.trust_domain)
    issuer = NodeTokenIssuer.load_or_create(home / TOKEN_KEY_FILE)
    service = CertificateService(
        authority, issuer.authenticator(), WorkloadPodLocator(discovery), CAMetrics(metrics.registry)
    )
    add_ca(server, AsyncCertificateServicer(service))
    if not opts.plaintext:
        creds, rotating = server_credentials(authority, _serving_hosts(opts))
        root_pem = rotating.current.root_pem
    extras.update(authority=authority, token_issuer=issuer)
    if creds is not None:
        grpc_port = server.add_secure_port(opts.grpc_listen, creds)
    else:
        grpc_port = server.add_insecure_port(opts.grpc_listen)
    if grpc_port == 0:
        raise ControlPlaneError(f"cannot listen on {opts.grpc_listen}: is another control plane running?")
    await server.start()

    # HTTP: metrics (TCP) and debug (Unix socket).
    http = DebugHttp(metrics.registry, discovery.connections)
    mhost, mport = split_hostport(opts.metrics_listen)
    tcp = await asyncio.start_server(http.handle, mhost, mport)
    metrics_port = tcp.sockets[0].getsockname()[1]
    debug_path = home / DEBUG_SOCKET
    debug_path.unlink(missing_ok=True)
    unix = await asyncio.start_unix_server(http.handle, path=str(debug_path))
    os.chmod(debug_path, 0o600)

    # The apply API.
    api_handle = _start_api(home, extras, metrics)

    running = Running(grpc_port, metrics_port, root_pem, discovery, extras)
    write_atomic(
        home / ENDPOINTS_FILE,
        json.dumps(
            {"pid": os.getpid(), "grpc": f"{split_hostport(opts.grpc_listen)[0]}:{grpc_port}",
             "metrics": f"{mhost}:{metrics_port}", "debug_socket": DEBUG_SOCKET}
        ).encode(),
    )
    log_event("started", grpc_port=grpc_port, metrics_port=metrics_port, tls=creds is not None,
              version=discovery.version)
    if ready is not None:
        ready(running)
    try:
        await stop.wait()
    finally:
        log_event("stopping")
        if api_handle is not None:
            with contextlib.suppress(Exception):
                api_handle.stop()
        await discovery.stop()
        await server.stop(grace=1.0)
        for srv in (tcp, unix):
            srv.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(tcp.wait_closed(), unix.wait_closed()), 2)
        debug_path.unlink(missing_ok=True)
        (home / ENDPOINTS_FILE).unlink(missing_ok=True)


class ControlPlaneThread:
    """Runs `serve` on its own event loop in a thread (tests, benchmarks, embedding)."""

    def __init__(self, opts: Options, source: ResourceSource | None = None) -> None:
        self.opts = opts
        self.source = source
        self.running: Running | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="controlplane", daemon=True)

    def start(self, timeout: float = 30.0) -> Running:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ControlPlaneError("control plane did not start in time")
        if self._error is not None:
            raise self._error
        assert self.running is not None
        return self.running

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn()` on the control plane's event loop and return its result (read state safely)."""
        assert self._loop is not None

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(r: Running) -> None:
                self.running = r
                self._ready.set()

            await serve(self.opts, self.source, ready=ready, stop=self._stop)

        try:
            asyncio.run(run())
        except BaseException as exc:
            self._error = exc
            self._ready.set()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlplane.main",
        description="Run the mesh control plane: discovery (delta xDS) and CA on TLS gRPC, the apply API, metrics.",
    )
    p.add_argument("--state-dir", type=Path, required=True, help="cluster state directory (uses DIR/controlplane/)")
    p.add_argument("--grpc-listen", default="0.0.0.0:15012", help="discovery + CA, TLS (default %(default)s)")
    p.add_argument("--metrics-listen", default="0.0.0.0:15014", help="Prometheus /metrics (default %(default)s)")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)")
    p.add_argument(
        "--serving-host",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP clients dial, put in the serving certificate (repeatable; default localhost, 127.0.0.1)",
    )
    p.add_argument("--plaintext", action="store_true", help="no TLS (debugging only)")
    p.add_argument("--debounce", type=float, default=0.0, help="seconds to gather changes before a push")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(message)s", stream=sys.stderr
    )
    opts = Options(
        state_dir=args.state_dir,
        grpc_listen=args.grpc_listen,
        metrics_listen=args.metrics_listen,
        trust_domain=args.trust_domain,
        serving_hosts=args.serving_host,
        plaintext=args.plaintext,
        debounce=args.debounce,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(opts, stop=stop)

    try:
        asyncio.run(run())
    except MeshError as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
