"""What the security tests share: the waypoint's own test harness (real sockets on 127.0.0.1) and a front
that admits each connection the way the HBONE inbound does, with a client-chosen `Forwarded` header."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from mesh.hbone.headers import parse_authority
from mesh.identity import SpiffeId
from tests.unit.waypoint.waypoint_harness import (
    fq,
    request,
    running_proxy,
    service,
    start_backend,
    table,
    workload,
)
from tests.unit.waypoint.waypoint_resources import l7
from waypoint.inbound import Refusal, admit
from waypoint.proxy import WaypointProxy

__all__ = ["GATEWAY", "SLEEP", "Admitting", "admitting_front", "backend_json", "fq", "l7", "policy", "request", "reviews_table",
           "run", "running_proxy", "service", "start_backend", "table", "workload"]

SLEEP = SpiffeId("cluster.local", "bookinfo", "sleep")
GATEWAY = [{"kind": "Gateway", "name": "waypoint"}]


def run(fn: Callable[[], Awaitable[None]], limit: float = 15.0, clock: trio.abc.Clock | None = None) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()
    trio.run(main, clock=clock)


def policy(name: str, spec: dict[str, Any], ns: str = "bookinfo") -> Any:
    return l7("AuthorizationPolicy", name, {"targetRefs": GATEWAY, **spec}, ns=ns)


def reviews_table(backend_port: int, *configs: Any) -> Any:
    """reviews (VIP 10.96.0.11:9080, bound to bookinfo/waypoint) with one endpoint on 127.0.0.1."""
    svc = service("reviews", "10.96.0.11")
    svc.waypoint.name, svc.waypoint.namespace = "waypoint", "bookinfo"
    return table([svc], [workload("reviews-v1", "reviews", "v1", backend_port)], list(configs))


def backend_json(body: bytes) -> dict[str, Any]:
    return dict(json.loads(body))


@dataclass
class Admitting:
    """Hands each TCP connection to the proxy as the HBONE inbound would: `admit` decides who the client
    is from the connection's peer address and a `Forwarded` value the client wrote."""

    proxy: WaypointProxy
    destination: str
    forwarded_for: str | None
    port: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        client = admit(self.proxy.table, parse_authority(self.destination), SLEEP, self.forwarded_for,
                       f"{host}:{port}")
        assert not isinstance(client, Refusal), client
        await self.proxy.serve_tunnel(stream, client)


async def admitting_front(proxy: WaypointProxy, destination: str, forwarded_for: str | None,
                          nursery: trio.Nursery) -> Admitting:
    """An `Admitting` front listening on 127.0.0.1 (in `nursery`) for tunnels to `destination`."""
    front = Admitting(proxy, destination, forwarded_for)
    listeners = await nursery.start(partial(trio.serve_tcp, front.handle, 0, host="127.0.0.1"))
    front.port = listeners[0].socket.getsockname()[1]
    return front
