"""The waypoint's admin endpoint (loopback, 15000) and its process metrics, beside the request metrics.

    GET /              the list of endpoints
    GET /healthz       200 "ok" while the process runs
    GET /config_dump   JSON: the compiled configuration (services, routes, policies), versions, warnings
    GET /certs         JSON: the waypoint's own certificate (identity, state, expiry)
    GET /stats         JSON: open tunnels, HBONE connections in and out, refusals

Pure routing on `mesh.serve` (a `Request` in, a `Response` out), so it is tested without sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from mesh.serve.endpoints import admin_handler
from mesh.serve.routes import Request, Response, plain


class AdminView:
    def __init__(self, config: Callable[[], Mapping[str, Any]], certs: Callable[[], Sequence[object]],
                 stats: Callable[[], Mapping[str, Any]], *, name: str = "") -> None:
        self._router = admin_handler(f"waypoint admin{' of ' + name if name else ''}", {
            "/config_dump": lambda _: Response.json(dict(config())),
            "/certs": lambda _: Response.json({"certificates": [plain(c) for c in certs()]}),
            "/stats": lambda _: Response.json(dict(stats())),
        })

    def handle(self, request: Request) -> Response:
        return self._router(request)


class ProcessMetrics:
    """Gauges read when scraped: discovery, configuration, certificate and tunnel state."""

    def __init__(self, registry: CollectorRegistry, *, connected: Callable[[], bool],
                 config_version: Callable[[], int], certificate_expiry: Callable[[], float],
                 tunnels: Callable[[], int], inbound_connections: Callable[[], int],
                 upstream_connections: Callable[[], int]) -> None:
        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(name, doc, registry=registry).set_function(lambda: float(fn()))

        gauge("waypoint_xds_connected", "1 while the discovery stream is up", connected)
        gauge("waypoint_config_version", "Configuration updates applied since start", config_version)
        gauge("waypoint_certificate_expiry_seconds", "Expiry of the waypoint's certificate (Unix time, 0: none)",
              certificate_expiry)
        gauge("waypoint_tunnels", "Inbound HBONE tunnels open now", tunnels)
        gauge("waypoint_inbound_connections", "Inbound HBONE connections open now", inbound_connections)
        gauge("waypoint_upstream_connections", "HBONE connections to endpoints open now", upstream_connections)
