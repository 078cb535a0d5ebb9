"""The control plane's HTTP endpoints as routes: debug is local-only and read on the discovery loop."""

from __future__ import annotations

import asyncio
import json
import threading

from prometheus_client import CollectorRegistry, Gauge

from controlplane.discovery.http import http_endpoints
from mesh.serve.routes import Request


def test_routes_and_local_only_debug() -> None:
    async def main() -> None:
        loop_thread = threading.current_thread().name
        reg = CollectorRegistry()
        Gauge("pilot_xds", "x", registry=reg).set(2)
        router = http_endpoints(reg, lambda: {"clients": [], "read_on": threading.current_thread().name},
                                asyncio.get_running_loop())
        assert router(Request.parse("GET", "/debug/connections", local=False)).status == 403
        reply = await asyncio.to_thread(router, Request.parse("GET", "/debug/connections"))
        assert json.loads(reply.body) == {"clients": [], "read_on": loop_thread}
        assert b"pilot_xds 2.0" in router(Request.parse("GET", "/metrics", local=False)).body
        assert router(Request.parse("GET", "/healthz/ready", local=False)).body == b"ready\n"

    asyncio.run(main())
