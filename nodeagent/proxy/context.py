"""What a pod's proxies share: who the pod is, and narrow handles to the agent's parts.

`AgentParts` holds the agent-wide pieces (the read model, certificates, the HBONE pool, metrics, the
access log); `PodContext` adds the pod.  The proxies read the state; they never change it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import trio

from mesh.errors import MeshError
from mesh.hbone.config import ListenerLimits
from mesh.hbone.pool import ConnectFn, HbonePool, PoolKey
from mesh.hbone.server import ListenerGate
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.manager import SecretManager
from nodeagent.accesslog import AccessLog
from nodeagent.metrics import NodeAgentMetrics
from nodeagent.pods.source import PodRef
from nodeagent.proxy.sockets import BUSY, connecting_socket_in, source_port, transparent_socket_in
from nodeagent.redirect.base import Redirector
from nodeagent.state import MeshState
from nodeagent.tracing import TunnelTracer

log = logging.getLogger("nodeagent.proxy")


@dataclass(frozen=True)
class AgentParts:
    state: MeshState
    certs: SecretManager
    pool: HbonePool
    metrics: NodeAgentMetrics
    log: AccessLog
    trust_domain: str
    connect_timeout: float
    redirector: Redirector
    hbone_limits: ListenerLimits = ListenerLimits()  # the caps of each pod's 15008
    tracer: TunnelTracer | None = None  # tunnel spans (None: the agent does not trace)


@dataclass(frozen=True)
class PodContext:
    pod: PodRef
    parts: AgentParts
    hbone_gate: ListenerGate = field(init=False, compare=False)  # the caps of this pod's 15008, counted

    def __post_init__(self) -> None:
        object.__setattr__(self, "hbone_gate", ListenerGate(self.parts.hbone_limits))

    def workload(self) -> pb.Workload | None:
        return self.parts.state.workload(self.pod.uid)

    async def connect_from_pod(self, address: tuple[str, int], *, source: str | None = None) -> trio.SocketStream:
        """A TCP connection made from inside the pod's namespace with the agent's mark; from `source`
        (the client's address, so the application sees it) when given and the node allows it."""
        return await connect_in(self.pod.netns, address, self.parts.connect_timeout, source=source)


TRANSPARENT_ATTEMPTS = 8  # source ports tried when the chosen one is taken for that client and app port
_transparent_refused: set[str] = set()  # errors already logged: a node that cannot, says so once


async def connect_in(netns: str, address: tuple[str, int], timeout: float, *,
                     source: str | None = None) -> trio.SocketStream:
    """A marked TCP connection from inside `netns` to `address`; from `source` (a transparent socket,
    see `sockets.transparent_socket_in`) when given and the node allows it."""
    deadline = trio.current_time() + timeout
    attempts = TRANSPARENT_ATTEMPTS if source is not None else 1
    for attempt in range(attempts):
        last = attempt + 1 == attempts
        try:
            sock = trio.socket.from_stdlib_socket(_socket_in(netns, source))
        except OSError as exc:
            if exc.errno in BUSY and not last:
                continue  # that source port is taken: another
            raise
        try:
            with trio.fail_at(deadline):
                await sock.connect(address)
        except trio.TooSlowError as exc:
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
        return trio.SocketStream(sock)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _socket_in(netns: str, source: str | None) -> socket.socket:
    if source is not None:
        try:
            return transparent_socket_in(netns, source, source_port())
        except PermissionError as exc:  # no CAP_NET_ADMIN: best effort, as ztunnel's default
            if str(exc) not in _transparent_refused:
                _transparent_refused.add(str(exc))
                log.warning("cannot connect to applications from their clients' addresses (%s): they will see "
                            "the pod's own address; give the node agent CAP_NET_ADMIN", exc)
    return connecting_socket_in(netns)


def pool_connect(timeout: float) -> ConnectFn:
    """The pool's dialer: HBONE connections leave from the source pod's namespace (`key.origin`)."""

    async def connect(key: PoolKey) -> trio.abc.Stream:
        return await connect_in(key.origin, key.address, timeout)

    return connect


def peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    addr = stream.socket.getpeername()
    return str(addr[0]), int(addr[1])


def local_of(stream: trio.SocketStream) -> tuple[str, int]:
    addr = stream.socket.getsockname()
    return str(addr[0]), int(addr[1])


def original_destination(ctx: PodContext, stream: trio.SocketStream) -> tuple[str, int]:
    """Where a captured connection was going.  One the capture has no record of was not redirected at
    all: it was sent to the listener itself, whose address is then its destination (a self-call)."""
    try:
        return ctx.parts.redirector.original_destination(stream.socket)  # type: ignore[arg-type]
    except (OSError, MeshError):
        return local_of(stream)


SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
