"""The inbound decision, as a value: admit a connection to this pod, or refuse it and say how.

Decide, then do (STYLE.md 2), as outbound does with `routing.decide`: the inbound path puts what it
knows into an `InboundConnection` (from the CONNECT request on 15008 with `from_connect`, from the
accepted socket on 15006 with `plaintext`), and `decide(view, pod, conn)` returns `Admit` or `Refusal`
before anything is answered or connected.  The inbound proxy then answers and forwards.

- A call to the agent itself (`selfcall`: loopback, or one of the agent's own ports of this pod, which
  would make the agent connect to its own listener without end): 400, flag NR.
- A CONNECT to an address that is not this pod's: 400, flag NR.
- This pod is no longer in the agent's view: 503, flag NR.
- L4 authorization denies, with the client's verified identity (none on plaintext, so a STRICT
  PeerAuthentication refuses it): 401, flag RBAC.
- Otherwise admitted, to the application at the pod's address and the port the client asked for, from
  the client's own address (`Admit.source`: the application sees who connected, as with Istio).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from mesh.hbone.headers import Authority
from mesh.hbone.server import InboundRequest
from mesh.identity import SpiffeId
from mesh.policy import evaluator as authz
from nodeagent.metrics import FailureReason, ResponseFlag
from nodeagent.pods.source import PodRef
from nodeagent.proxy.selfcall import agent_port, is_loopback
from nodeagent.state import MeshState


@dataclass(frozen=True)
class InboundConnection:
    """What the inbound path knows of a connection before any I/O."""

    source_ip: str
    source_port: int  # 0 when not known
    peer: SpiffeId | None  # the client's verified identity; None on plaintext
    destination: Authority  # where the client asked to go
    hbone: bool = False  # arrived as an HBONE CONNECT (on 15008), not as plaintext
    traceparent: str | None = None  # the CONNECT's trace context (the tunnel's span continues it)


@dataclass(frozen=True)
class Admit:
    address: tuple[str, int]  # the application, inside the pod
    decision: authz.Decision  # for the log: the policy that allowed, the audits and dry runs
    source: str | None = None  # the address to connect from: the client's, as Istio preserves it (None: the pod's)


@dataclass(frozen=True)
class Refusal:
    status: int  # the HBONE answer: 400, 401, 503
    flag: ResponseFlag
    reason: str
    failure: FailureReason  # the reason counted on mesh_agent_connection_failures_total
    decision: authz.Decision | None = None  # when authorization refused


def from_connect(request: InboundRequest) -> InboundConnection:
    """A CONNECT on 15008.  The source is the connection's own peer address (HBONE leaves the source pod
    with its address); `Forwarded` is the client's word, good for the log's port when it names that same
    address, but never for an ipBlocks decision."""
    src_ip = request.peer_address.rpartition(":")[0].strip("[]")
    fwd_ip, _, fwd_port = (request.forwarded_for or "").rpartition(":")
    src_port = int(fwd_port) if fwd_ip.strip("[]") == src_ip and fwd_port.isdigit() else 0
    return InboundConnection(src_ip, src_port, request.peer, request.authority, hbone=True,
                             traceparent=request.traceparent)


def plaintext(pod: PodRef, source: tuple[str, int], port: int, *, host: str | None = None) -> InboundConnection:
    """A connection on 15006, redirected there on its way to `port` of this pod (`host`: the address it
    was sent to, when known): no verified identity."""
    return InboundConnection(source[0], source[1], None, Authority(host or pod.ip, port))


def decide(view: MeshState, pod: PodRef, conn: InboundConnection) -> Admit | Refusal:
    host, port = conn.destination.host, conn.destination.port
    why = f"{conn.destination} is loopback: not an address of this pod" if is_loopback(host) else agent_port(port)
    if why is not None:
        return Refusal(400, ResponseFlag.NO_ROUTE, f"refused a call to the node agent itself: {why}",
                       FailureReason.SELF_CALL)
    if conn.destination.host != pod.ip:
        return Refusal(400, ResponseFlag.NO_ROUTE, f"{conn.destination} is not this pod ({pod.ip})",
                       FailureReason.BAD_REQUEST)
    destination = view.workload(pod.uid)
    if destination is None:
        return Refusal(503, ResponseFlag.NO_ROUTE, "this pod is no longer known to the agent",
                       FailureReason.UNKNOWN_DESTINATION)
    decision = authz.evaluate(authz.ConnectionInfo(conn.peer, conn.source_ip, destination, pod.ip, port),
                              view.policies_for(destination))
    if decision.denied:
        return Refusal(401, ResponseFlag.DENIED, decision.reason, FailureReason.DENIED, decision)
    return Admit((pod.ip, port), decision, original_source(pod, conn.source_ip))


def original_source(pod: PodRef, client_ip: str) -> str | None:
    """The client's address to connect to the application from, when it can be (IPv4, not the pod's own
    nor loopback; ztunnel connects directly in those cases too)."""
    if client_ip == pod.ip or is_loopback(client_ip) or not _is_ipv4(client_ip):  # (is_loopback: cached)
        return None
    return client_ip


def _is_ipv4(ip: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        return False
    return True
