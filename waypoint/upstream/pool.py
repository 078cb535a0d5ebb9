"""Connections toward endpoints: the injected `Upstream` connector and a keep-alive pool over it.

The waypoint never opens sockets itself.  An `Upstream` turns an endpoint into a byte stream: in the mesh
that is an HBONE tunnel to the endpoint's node agent; `TcpUpstream` (plain TCP) serves tests and
benchmarks.  `ConnectionPool` keeps idle HTTP connections per (endpoint, protocol, client) and reuses
them.  The client is part of the key because a connection to an endpoint carries the original client's
address (the HBONE `Forwarded` header, which the destination's L4 policy reads): a connection opened
for one client is never handed to another.  `discard(client)` closes a client's idle connections once
its tunnel is gone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

import trio

from waypoint.errors import ConnectFailure
from waypoint.http.exchange import UpstreamConnection
from waypoint.http.http1 import Http1Client
from waypoint.http.http2 import Http2Client
from waypoint.l7.model import Endpoint


class Upstream(Protocol):
    """Opens a byte stream to an endpoint.  `service` is the service hostname the request was for ("" for
    workload-addressed traffic) and `client` the original client's `ip:port` ("" when unknown), both for
    the tunnel's `Forwarded` header; `traceparent` the trace context of the request that opens it (the
    tunnel's CONNECT carries it, so the destination's agent links its span).  Raise `ConnectFailure` (or
    OSError) when the endpoint cannot be reached."""

    async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                      traceparent: str = "") -> trio.abc.HalfCloseableStream: ...


class TcpUpstream:
    """Plain TCP to `endpoint.address:endpoint.port` (tests, benchmarks, non-mesh endpoints)."""

    async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                      traceparent: str = "") -> trio.abc.HalfCloseableStream:
        try:
            return await trio.open_tcp_stream(endpoint.address, endpoint.port)
        except OSError as exc:
            raise ConnectFailure(f"cannot connect to {endpoint.key}: {exc.strerror or exc}") from exc


class ConnectionPool:
    def __init__(self, upstream: Upstream, idle_timeout: float = 60.0, max_idle: int = 32,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._clock = clock
        self._idle: dict[tuple[str, str, str], list[tuple[float, UpstreamConnection]]] = defaultdict(list)
        self.opened = 0

    async def acquire(self, endpoint: Endpoint, protocol: str, connect_timeout: float,
                      service: str = "", client: str = "", traceparent: str = "") -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the pool (`traceparent`: of the request that would
        open a new one)."""
        idle = self._idle[(endpoint.key, protocol, client)]
        now = self._clock()
        while idle:
            since, conn = idle.pop()
            if now - since < self.idle_timeout:
                return conn, True
            await conn.aclose()
        with trio.move_on_after(connect_timeout) as cs:
            stream = await self.upstream.connect(endpoint, service=service, client=client, traceparent=traceparent)
        if cs.cancelled_caught:
            raise ConnectFailure(f"connection to {endpoint.key} timed out after {connect_timeout:g}s")
        self.opened += 1
        if protocol == "HTTP/2":
            return Http2Client(stream), False
        return Http1Client(stream), False

    async def release(self, endpoint: Endpoint, protocol: str, conn: UpstreamConnection, reuse: bool = True,
                      client: str = "") -> None:
        idle = self._idle[(endpoint.key, protocol, client)]
        if reuse and conn.reusable and len(idle) < self.max_idle:
            idle.append((self._clock(), conn))
        else:
            await conn.aclose()

    async def discard(self, client: str) -> None:
        """Close the idle connections kept for `client` (its tunnel is gone: nobody will reuse them)."""
        for key in [k for k in self._idle if k[2] == client]:
            for _, conn in self._idle.pop(key):
                await conn.aclose()

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for _, conn in idle:
                await conn.aclose()
        self._idle.clear()
