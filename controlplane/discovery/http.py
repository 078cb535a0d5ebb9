"""The control plane's small HTTP endpoints, on asyncio so they read the discovery state in its own loop.

    GET /metrics             Prometheus text (on the metrics port 15014 and the debug socket)
    GET /healthz/ready       200 "ok"
    GET /debug/connections   JSON: connected discovery clients, last ACKed versions, NACKs

`/debug/*` is local-only: it is served on the Unix socket `<state dir>/controlplane/debug.sock` and, on
the TCP port, only to loopback peers.  HTTP/1.0-style: one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

MAX_REQUEST = 16 * 1024


class DebugHttp:
    def __init__(self, registry: CollectorRegistry, connections: Callable[[], dict[str, Any]]) -> None:
        self._registry = registry
        self._connections = connections

    def route(self, path: str, local: bool) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz/ready":
            return 200, "text/plain", b"ok\n"
        if path.startswith("/debug/"):
            if not local:
                return 403, "text/plain", b"debug endpoints are local-only\n"
            if path == "/debug/connections":
                body = json.dumps(self._connections(), indent=1).encode()
                return 200, "application/json", body
        return 404, "text/plain", b"not found\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, path, _ = line.split(" ", 2)
            if method != "GET":
                status, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                status, ctype, body = self.route(path, _is_local(writer))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}
        writer.write(
            f"HTTP/1.1 {status} {reason.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def _is_local(writer: asyncio.StreamWriter) -> bool:
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple):  # a Unix socket
        return True
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False
