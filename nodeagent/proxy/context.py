"""What a pod's proxies share: who the pod is, and narrow handles to the agent's parts.

`AgentParts` holds the agent-wide pieces (the read model, certificates, the HBONE pool, metrics, the
access log); `PodContext` adds the pod.  The proxies read the state; they never change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from mesh.hbone.pool import ConnectFn, HbonePool, PoolKey
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.manager import SecretManager
from nodeagent.accesslog import AccessLog
from nodeagent.metrics import NodeAgentMetrics
from nodeagent.pods.source import PodRef
from nodeagent.proxy.sockets import connecting_socket_in
from nodeagent.redirect.base import Redirector
from nodeagent.state import MeshState


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


@dataclass(frozen=True)
class PodContext:
    pod: PodRef
    parts: AgentParts

    def workload(self) -> pb.Workload | None:
        return self.parts.state.workload(self.pod.uid)

    async def connect_from_pod(self, address: tuple[str, int]) -> trio.SocketStream:
        """A TCP connection made from inside the pod's namespace with the agent's mark."""
        return await connect_in(self.pod.netns, address, self.parts.connect_timeout)


async def connect_in(netns: str, address: tuple[str, int], timeout: float) -> trio.SocketStream:
    sock = trio.socket.from_stdlib_socket(connecting_socket_in(netns))
    try:
        with trio.fail_after(timeout):
            await sock.connect(address)
    except trio.TooSlowError as exc:
        sock.close()
        raise TimeoutError(f"connecting to {address[0]}:{address[1]} timed out after {timeout:.0f}s") from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def pool_connect(timeout: float) -> ConnectFn:
    """The pool's dialer: HBONE connections leave from the source pod's namespace (`key.origin`)."""

    async def connect(key: PoolKey) -> trio.abc.Stream:
        return await connect_in(key.origin, key.address, timeout)

    return connect


def peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    addr = stream.socket.getpeername()
    return str(addr[0]), int(addr[1])


SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
