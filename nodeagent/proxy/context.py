"""What a pod's proxies share: who the pod is, and narrow handles to the agent's parts.

`AgentParts` holds the agent-wide pieces (the read model, certificates, the HBONE pool, metrics, the
access log, the data path's engine and its socket supply); `PodContext` adds the pod.  The proxies read
the state; they never change it.  Everything here that connects runs on the engine (`mesh.hbone.engine`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from mesh.errors import MeshError
from mesh.hbone.aiopool import AioConnectFn, AioPool, begin_connect, finish_connect
from mesh.hbone.config import ListenerLimits
from mesh.hbone.engine import Engine
from mesh.hbone.pool import PoolKey
from mesh.hbone.server import ListenerGate
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.manager import SecretManager
from mesh.secrets.svid import Svid
from nodeagent.accesslog import AccessLog
from nodeagent.dns.upstream import Resolver
from nodeagent.metrics import NodeAgentMetrics
from nodeagent.pods.source import PodRef
from nodeagent.proxy.recheck import AdmittedConnections
from nodeagent.proxy.sockets import BUSY, SocketSupply, make_transparent, source_port
from nodeagent.redirect.base import Redirector
from nodeagent.state import MeshState
from nodeagent.tracing import TunnelTracer

log = logging.getLogger("nodeagent.proxy")


@dataclass(frozen=True)
class AgentParts:
    state: MeshState
    certs: SecretManager
    pool: AioPool
    metrics: NodeAgentMetrics
    log: AccessLog
    trust_domain: str
    connect_timeout: float
    redirector: Redirector
    hbone_limits: ListenerLimits = ListenerLimits()  # the caps of each pod's 15008
    tracer: TunnelTracer | None = None  # tunnel spans (None: the agent does not trace)
    engine: Engine | None = None  # where the data path runs (None: each pod's proxy starts its own)
    sockets: SocketSupply = field(default_factory=SocketSupply)  # the engine's, sockets made in pods
    resolver: Resolver | None = None  # names of DNS ServiceEntry endpoints (trio; None: they cannot be reached)
    admitted: AdmittedConnections = field(default_factory=AdmittedConnections)  # inbound ones relayed (`recheck`)


@dataclass(frozen=True)
class PodContext:
    pod: PodRef
    parts: AgentParts
    hbone_gate: ListenerGate = field(init=False, compare=False)  # the caps of this pod's 15008, counted

    def __post_init__(self) -> None:
        object.__setattr__(self, "hbone_gate", ListenerGate(self.parts.hbone_limits))

    def workload(self) -> pb.Workload | None:
        return self.parts.state.workload(self.pod.uid)

    async def connect_from_pod(self, address: tuple[str, int], *, source: str | None = None) -> socket.socket:
        """(On the engine.)  A TCP connection made from inside the pod's namespace with the agent's mark;
        from `source` (the client's address, so the application sees it) when given and the node allows it."""
        return await connect_in(self.parts.sockets, self.pod.netns, address, self.parts.connect_timeout,
                                source=source, reserved_ports=self.parts.redirector.mode == "ebpf")

    async def certificate(self, engine: Engine) -> Svid:
        """(On the engine.)  The pod's certificate: the one held, or asked of the secret manager (in trio)
        when there is none yet or it has expired."""
        svid = self.parts.certs.current(self.pod.identity)
        if svid is None or svid.not_after <= time.time():
            svid = await engine.from_trio(self.parts.certs.get, self.pod.identity)
        return svid


TRANSPARENT_ATTEMPTS = 8  # reserved source ports tried when the chosen one is taken for that client and app port
_transparent_refused: set[str] = set()  # errors already logged: a node that cannot, says so once


async def connect_in(supply: SocketSupply, netns: str, address: tuple[str, int], timeout: float, *,
                     source: str | None = None, reserved_ports: bool = False) -> socket.socket:
    """(On the engine.)  A marked TCP connection from inside `netns` to `address` (a socket from
    `supply`); from `source` (a transparent socket, see `sockets.transparent_socket_in`) when given and
    the node allows it: from a port the kernel picks at connect(), or with `reserved_ports` (eBPF mode,
    which routes the application's replies by the port) one of `TRANSPARENT_PORTS`, retried when taken."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    attempts = TRANSPARENT_ATTEMPTS if source is not None and reserved_ports else 1
    for attempt in range(attempts):
        last = attempt + 1 == attempts
        sock = supply.take(netns)
        try:
            if source is not None:
                _bind_transparent(sock, source, source_port() if reserved_ports else 0)
        except OSError as exc:
            sock.close()
            if exc.errno in BUSY and not last:
                continue  # that source port is taken: another
            raise
        try:
            if not begin_connect(sock, address):  # (a connect within the node is mostly done at once)
                async with asyncio.timeout_at(deadline):
                    await finish_connect(sock, address)
        except TimeoutError as exc:
            sock.close()
            raise TimeoutError(f"connecting to {address[0]}:{address[1]} timed out after {timeout:.0f}s") from exc
        except OSError as exc:
            sock.close()
            if exc.errno in BUSY and not last:
                continue  # that source port is taken towards this address: another
            raise
        except BaseException:
            sock.close()
            raise
        return sock
    raise AssertionError("unreachable: the last attempt returns or raises")


def _bind_transparent(sock: socket.socket, source: str, port: int) -> None:
    try:
        make_transparent(sock, source, port)
    except PermissionError as exc:  # no CAP_NET_ADMIN: best effort, as ztunnel's default
        if str(exc) not in _transparent_refused:
            _transparent_refused.add(str(exc))
            log.warning("cannot connect to applications from their clients' addresses (%s): they will see "
                        "the pod's own address; give the node agent CAP_NET_ADMIN", exc)


def pool_connect(supply: SocketSupply, timeout: float) -> AioConnectFn:
    """The pool's dialer: HBONE connections leave from the source pod's namespace (`key.origin`)."""

    async def connect(key: PoolKey) -> socket.socket:
        return await connect_in(supply, key.origin, key.address, timeout)

    return connect


def peer_of(transport: asyncio.BaseTransport) -> tuple[str, int]:
    addr = transport.get_extra_info("peername")
    return str(addr[0]), int(addr[1])


def local_of(transport: asyncio.BaseTransport) -> tuple[str, int]:
    addr = transport.get_extra_info("sockname")
    return str(addr[0]), int(addr[1])


def original_destination(ctx: PodContext, transport: asyncio.BaseTransport) -> tuple[str, int]:
    """Where a captured connection was going.  One the capture has no record of was not redirected at
    all: it was sent to the listener itself, whose address is then its destination (a self-call)."""
    sock: Any = transport.get_extra_info("socket")
    try:
        return ctx.parts.redirector.original_destination(sock)
    except (OSError, MeshError):
        return local_of(transport)


SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
