"""The waypoint's HBONE inbound (15008): mutual TLS, CONNECT admission, tunnels handed to the proxy.

    TCP accept -> TLS 1.3 with the waypoint's own certificate (a client certificate of the trust domain
    required) -> HTTP/2 CONNECT per tunnel -> `admit` (pure): 400 unless `:authority` is the VIP:port
    of a service bound to this waypoint or a workload that uses it -> 200 -> `WaypointProxy.serve_tunnel`
    with who the client is (verified identity, the connection's peer address, original destination)

The client's address is the HBONE connection's own peer address: a source node agent opens it from
inside the source pod, so it leaves with the pod's address.  `Forwarded` is the client's word: only its
port is taken, and only when it names that same address (as the node agent's inbound does).

Binding and unbinding a service are heard by the node agents and by the waypoint from the same push, in no
set order, so admission allows for either side being a moment behind (`ConfigSkew`): a CONNECT for a
service not (yet) bound to this waypoint waits up to `skew_seconds` for the next configuration before it is
refused (an agent heard of the binding first), and a service admitted within the last `skew_seconds` is
still admitted after its unbinding (an agent that has not heard of it yet still sends here; `meshctl
waypoint delete` waits for the agents before the waypoint goes).  Without this, every binding and
unbinding under load refused a few tunnels (the client saw a reset).

Tunnels that turn out not to be HTTP reach `l4`: the waypoint's policies at L4 (`waypoint.l7.l4authz`),
then the proxy's passthrough.  `drain()` stops accepting and sends GOAWAY on every connection, so the
node agents open new tunnels elsewhere while those in flight finish.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from mesh import defaults
from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.hbone.errors import HboneError
from mesh.hbone.headers import Authority
from mesh.hbone.server import HboneServerConnection, InboundRequest, ListenerGate, TunnelAcceptor, serve_hbone
from mesh.identity import SpiffeId
from mesh.secrets.errors import SecretsError
from mesh.secrets.manager import SecretManager
from waypoint.config import RouteTable
from waypoint.errors import STREAM_GONE
from waypoint.l7 import l4authz
from waypoint.l7.model import ClientInfo, split_host_port
from waypoint.listen import open_listeners
from waypoint.proxy import WaypointProxy

log = logging.getLogger("waypoint.inbound")

SKEW_POLL = 0.02  # seconds between looks at the table while a CONNECT waits for configuration (`ConfigSkew`)

@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str

    def event(self, request: InboundRequest) -> str:
        """The event line of the CONNECT refused."""
        return json.dumps({"event": "tunnel refused", "status": self.status, "authority": str(request.authority),
                           "peer": str(request.peer or ""), "reason": self.reason}, separators=(",", ":"))


def admit(table: RouteTable, authority: Authority, peer: SpiffeId | None, forwarded_for: str | None,
          peer_address: str) -> ClientInfo | Refusal:
    """Decide one CONNECT: who the client is, or why it is refused."""
    why = table.refusal(authority.host, authority.port)
    if why:
        return Refusal(400, f"{authority}: {why}")
    return ClientInfo(peer_identity=str(peer) if peer else "", source=_source(peer_address, forwarded_for),
                      original_destination=str(authority))


@dataclass
class ConfigSkew:
    """What admission remembers to bridge the moment between an agent's and this waypoint's configuration:
    the destinations it admitted lately (`host:port` -> when), kept `seconds`."""

    seconds: float = 2.0
    admitted: dict[str, float] = field(default_factory=dict)
    limit: int = 4096

    def note(self, authority: str, now: float) -> None:
        self.admitted[authority] = now
        if len(self.admitted) > self.limit:  # forget the oldest (and anything stale)
            cutoff = now - self.seconds
            kept = sorted(((t, a) for a, t in self.admitted.items() if t >= cutoff), reverse=True)[: self.limit // 2]
            self.admitted = {a: t for t, a in kept}

    def recently_admitted(self, authority: str, now: float) -> bool:
        when = self.admitted.get(authority)
        return when is not None and now - when <= self.seconds

    def decide(self, table: RouteTable, request: InboundRequest, started: float) -> ClientInfo | Refusal | None:
        """One look at a CONNECT that arrived at `started`: who the client is (admitted, or unbound here
        lately and still admitted), why it is refused (for longer than `seconds`), or None: wait for the
        next table and look again."""
        authority = str(request.authority)
        decision = admit(table, request.authority, request.peer, request.forwarded_for, request.peer_address)
        now = time.monotonic()
        if not isinstance(decision, Refusal):
            self.note(authority, now)
            return dataclasses.replace(decision, peer_certificate_hash=request.peer_certificate_hash)
        if self.recently_admitted(authority, now):  # unbound here, not yet at the sending agent
            return ClientInfo(peer_identity=str(request.peer) if request.peer else "",
                              source=_source(request.peer_address, request.forwarded_for),
                              original_destination=authority, peer_certificate_hash=request.peer_certificate_hash)
        return decision if now - started >= self.seconds else None

    async def wait_admit(self, table: Callable[[], RouteTable], request: InboundRequest,
                         sleep: Callable[[float], Awaitable[object]]) -> ClientInfo | Refusal:
        """`decide` on the current `table()` until it decides, looking again when the table changes (at
        most `seconds`); `sleep` is the running loop's (trio's or the engine's)."""
        started = time.monotonic()
        while True:
            current = table()
            decision = self.decide(current, request, started)
            if decision is not None:
                return decision
            while table() is current and time.monotonic() - started < self.seconds:
                await sleep(SKEW_POLL)  # bound at the agent, maybe not yet here: wait for the next table


def _source(peer_address: str, forwarded_for: str | None) -> str:
    """The verified peer `ip:port`, with the port `Forwarded` names when it names the same address."""
    if peer_address == "?":
        return ""
    ip, port = split_host_port(peer_address)
    fwd_ip, fwd_port = split_host_port(forwarded_for or "")
    if fwd_port and fwd_ip == ip:
        port = fwd_port
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class InboundServer:
    def __init__(self, proxy: WaypointProxy, certs: SecretManager, identity: SpiffeId, *,
                 trust_domain: str = defaults.TRUST_DOMAIN, handshake_timeout: float = 10.0,
                 event_log: Callable[[str], None] = stdout_line, skew_seconds: float = 2.0,
                 limits: ListenerLimits | None = None, config: HboneConfig | None = None,
                 reuse_port: bool = False) -> None:
        self.proxy = proxy
        self.reuse_port = reuse_port  # the listener is shared with the waypoint's other workers (`waypoint.listen`)
        self.certs = certs
        self.identity = identity
        self.trust_domain = trust_domain
        self.handshake_timeout = handshake_timeout
        self.event_log = event_log
        self.connections: set[HboneServerConnection] = set()
        self.gate = ListenerGate(limits)  # 15008's caps: connections open and TLS handshakes at once
        self.config = config  # HBONE settings of each connection (streams at once, windows); None: defaults
        self.tunnels = 0  # open now
        self.refused = 0  # CONNECTs answered 400 since start
        self.skew = ConfigSkew(skew_seconds)
        self._accepting = trio.CancelScope()

    # ---- listening --------------------------------------------------------------------------------

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port and serve until cancelled; reports the bound port.  After `drain()` the
        listener is closed and this returns once the last connection has ended."""
        listeners = await open_listeners(port, host, shared=self.reuse_port)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with self._accepting:
                task_status.started(bound)
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    def drain(self) -> None:
        """Stop accepting; ask every client to finish its tunnels and go elsewhere (GOAWAY)."""
        self._accepting.cancel()
        for conn in list(self.connections):
            conn.goaway()

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            await self.certs.get(self.identity)  # cached; renewed in the background
            ctx = self.certs.server_context(self.identity)
        except SecretsError as exc:
            log.warning("inbound HBONE refused: no certificate for %s yet: %s", self.identity, exc)
            await trio.aclose_forcefully(tcp)
            return
        tls: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            async with trio.open_nursery() as nursery:
                conn = await nursery.start(self._serve_hbone, tls)
                self.connections.add(conn)
                if self._accepting.cancel_called:
                    conn.goaway()  # arrived while draining
        except* HboneError as group:  # (the handshake's, say, reported by the connection's nursery)
            log.info("inbound HBONE connection ended: %s", "; ".join(map(str, group.exceptions)))
        except* STREAM_GONE:
            pass
        except* Exception:  # one connection's failure is not the listener's: logged, and the waypoint goes on
            log.exception("inbound HBONE connection failed")
        finally:
            self.connections = {c for c in self.connections if not c.is_closed}
            await trio.aclose_forcefully(tls)

    async def _serve_hbone(self, tls: trio.SSLStream[trio.abc.Stream],
                           task_status: trio.TaskStatus[HboneServerConnection]) -> None:
        try:
            await serve_hbone(tls, self.tunnel, trust_domain=self.trust_domain, config=self.config,
                              handshake_timeout=self.handshake_timeout, gate=self.gate, task_status=task_status)
        finally:
            self.connections = {c for c in self.connections if not c.is_closed}

    # ---- one tunnel ---------------------------------------------------------------------------------

    async def _admit(self, request: InboundRequest) -> ClientInfo | Refusal:
        """`admit`, allowing for the agents' configuration being a moment ahead of or behind this one's."""
        return await self.skew.wait_admit(lambda: self.proxy.table, request, trio.sleep)

    async def tunnel(self, request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        decision = await self._admit(request)
        if isinstance(decision, Refusal):
            self.refused += 1
            self.event_log(decision.event(request))
            await acceptor.reject(decision.status, decision.reason)
            return
        stream = await acceptor.accept()
        self.tunnels += 1
        try:
            await self.proxy.serve_tunnel(stream, decision)
        finally:
            self.tunnels -= 1

    async def l4(self, stream: trio.abc.HalfCloseableStream, client: ClientInfo) -> None:
        """A tunnel that is not HTTP: the waypoint's policies at L4, then bytes both ways."""
        await l4(self.proxy, self.event_log, stream, client)


async def l4(proxy: WaypointProxy, event_log: Callable[[str], None], stream: trio.abc.HalfCloseableStream,
             client: ClientInfo) -> None:
    """A tunnel that is not HTTP: the waypoint's policies at L4 (a denial logged to `event_log`), then the
    proxy's passthrough."""
    table = proxy.table
    hostname = table.by_vip.get(client.destination_ip, "")
    verdict = l4authz.decide(table.l4_policies, hostname, client)
    if not verdict.allowed:
        event_log(json.dumps({"event": "connection denied", "authority": client.original_destination,
                              "source": client.source, "peer": client.peer_identity,
                              "policy": verdict.policy or "", "reason": verdict.reason}, separators=(",", ":")))
        await trio.aclose_forcefully(stream)
        return
    await proxy.passthrough(stream, client)
