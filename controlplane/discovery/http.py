"""The control plane's HTTP endpoints (served by `mesh.serve` in a thread of their own, beside grpc.aio).

    GET /metrics             Prometheus text (on the metrics port 15014 and the debug socket)
    GET /healthz/ready       200 "ready"
    GET /debug/connections   JSON: connected discovery clients, last ACKed versions, NACKs

`/debug/*` is local-only: it is served on the Unix socket `<state dir>/controlplane/debug.sock` and, on
the TCP port, only to loopback peers (403 to others).  The connection table belongs to the discovery
server's asyncio loop, so it is read there (`call_on_loop`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from mesh.loopthread import call_on_loop
from mesh.serve.endpoints import Readiness, metrics_handler, readiness_handler, version_handler
from mesh.serve.routes import Request, Response, Router


def http_endpoints(registry: CollectorRegistry, connections: Callable[[], dict[str, Any]],
                   loop: asyncio.AbstractEventLoop) -> Router:
    """The routes; `connections` is read on `loop`, the discovery server's."""

    def debug_connections(request: Request) -> Response:
        if not request.local:
            return Response.text("debug endpoints are local-only", 403)
        return Response.json(call_on_loop(loop, connections))

    router = Router().include(metrics_handler(registry)).include(readiness_handler(lambda: Readiness(True)))
    router.include(version_handler())  # GET /version: what runs (`meshctl version`)
    return router.add("/debug/connections", debug_connections)
