"""The waypoint's HBONE inbound (15008) on the engine, and the connections it hands to trio.

    TCP accept (on the engine) -> `serve_tls`: TLS 1.3 with the waypoint's certificate, a client of the
    trust domain required -> each CONNECT: `waypoint.inbound.admit` with its allowance for configuration
    skew -> 200 -> the tunnel is a client connection of the engine's hop (`waypoint.engine.hop`)

What the hop does not do itself (HTTP/2, L4 passthrough, upgrades, streamed bodies, mirrors, HTTP/2
endpoints) comes back here (`_hand_off`): the tunnel is joined on the engine to one end of a socket pair,
and trio's `WaypointProxy.serve_detected` serves the other end, from the bytes the hop had received, as it
serves a tunnel of the trio inbound.  The inbound is the trio `InboundServer`'s counterpart (`serve`,
`drain`, `tunnels`, `refused`, `connections`), so the process runs either one the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

import trio

from mesh import defaults
from mesh.hbone.aio import AioAcceptor, AioServerConnection, TunnelEnd, accept_all, serve_tls
from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.hbone.engine import Engine, EngineError
from mesh.hbone.errors import HboneError, ListenerFull
from mesh.hbone.server import InboundRequest, ListenerGate
from mesh.hbone.splice import Splice, open_end
from mesh.identity import SpiffeId
from mesh.secrets.errors import SecretsError
from mesh.secrets.manager import SecretManager
from waypoint.engine.hop import EngineHop, TunnelTransport, _Client
from waypoint.http.detect import Protocol
from waypoint.inbound import ConfigSkew, Refusal
from waypoint.l7.model import ClientInfo
from waypoint.listen import listening_sockets
from waypoint.proxy import WaypointProxy

log = logging.getLogger("waypoint.inbound")


def engine_line(line: str) -> None:
    """An event or access-log line on stdout from the engine's thread: one write of the whole line, so
    that lines from trio's thread never cut into it."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(1, data):]


class EngineInbound:
    def __init__(self, proxy: WaypointProxy, hop: EngineHop, engine: Engine, certs: SecretManager,
                 identity: SpiffeId, *, trust_domain: str = defaults.TRUST_DOMAIN, handshake_timeout: float = 10.0,
                 event_log: Callable[[str], None] = engine_line, skew_seconds: float = 2.0,
                 limits: ListenerLimits | None = None, config: HboneConfig | None = None,
                 reuse_port: bool = False) -> None:
        self.proxy = proxy  # trio's: serves what is handed over
        self.hop = hop
        self.engine = engine
        self.certs = certs
        self.identity = identity
        self.trust_domain = trust_domain
        self.handshake_timeout = handshake_timeout
        self.event_log = event_log
        self.reuse_port = reuse_port
        self.gate = ListenerGate(limits)
        self.config = config
        self.connections: set[AioServerConnection] = set()
        self.refused = 0  # CONNECTs answered 400 since start
        self.handed_open = 0  # tunnels handed to trio, still open
        self.skew = ConfigSkew(skew_seconds)
        hop.handoff = self._hand_off
        self._listeners: list[socket.socket] = []
        self._draining = False
        self._done: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def tunnels(self) -> int:
        """Tunnels open now: the hop's client connections and those handed to trio."""
        return len(self.hop.clients) + self.handed_open

    # ---- listening (trio) ------------------------------------------------------------------------------

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port (accepting on the engine) and serve until cancelled; reports the bound port.
        After `drain()` the listener is closed and this returns once the last connection has ended."""
        socks = listening_sockets(port, host, shared=self.reuse_port)
        bound = socks[0].getsockname()[1]
        self._done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:  # what is handed over runs here
                self._nursery = nursery
                await self.engine.call(self._listen, socks)
                task_status.started(bound)
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with contextlib.suppress(EngineError):  # (not waited for: the engine may be stopping too)
                self.engine.call_soon(self._close_all)

    def drain(self) -> None:
        """Stop accepting; ask every client to finish its tunnels and go elsewhere (GOAWAY)."""
        self.engine.call_soon(self._drain)

    # ---- on the engine -----------------------------------------------------------------------------------

    async def _listen(self, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in socks:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), accept_all, sock, self._accept)
            self._listeners.append(sock)
        self.hop.start()

    def _accept(self, sock: socket.socket) -> None:
        self.hop.loop.create_task(self._connection(sock))

    async def _connection(self, sock: socket.socket) -> None:
        try:
            if self.certs.current(self.identity) is None:
                await self.engine.from_trio(self.certs.get, self.identity)
            ctx = self.certs.server_context(self.identity)
        except SecretsError as exc:
            log.warning("inbound HBONE refused: no certificate for %s yet: %s", self.identity, exc)
            sock.close()
            return
        try:
            conn = await serve_tls(sock, ctx, self._tunnel, trust_domain=self.trust_domain, gate=self.gate,
                                   config=self.config, timeout=self.handshake_timeout)
        except ListenerFull as exc:
            log.debug("inbound HBONE: %s", exc)
            return
        except HboneError as exc:
            log.info("inbound HBONE connection ended: %s", exc)
            return
        self.connections.add(conn)
        if self._draining:
            conn.goaway()  # arrived while draining
        conn.finished.add_done_callback(lambda _: self._gone(conn))

    def _gone(self, conn: AioServerConnection) -> None:
        self.connections.discard(conn)
        self._check_done()

    def _drain(self) -> None:
        self._draining = True
        self._close_listeners()
        for conn in list(self.connections):
            conn.goaway()
        self._check_done()

    def _check_done(self) -> None:
        if self._draining and not self.connections and not self.handed_open and self._done is not None:
            self.engine.to_trio_soon(self._done.set)

    def _close_listeners(self) -> None:
        loop = self.hop.loop
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners = []

    def _close_all(self) -> None:
        self._draining = True
        self._close_listeners()
        self.hop.stop()
        for conn in list(self.connections):
            conn.close()

    # ---- one tunnel (on the engine) ------------------------------------------------------------------------

    async def _admit(self, request: InboundRequest) -> ClientInfo | Refusal:
        """`admit`, allowing for the agents' configuration being a moment ahead of or behind this one's
        (`waypoint.inbound.ConfigSkew`)."""
        return await self.skew.wait_admit(lambda: self.hop.proxy.table, request, asyncio.sleep)

    async def _tunnel(self, request: InboundRequest, acceptor: AioAcceptor) -> None:
        decision = await self._admit(request)
        if isinstance(decision, Refusal):
            self.refused += 1
            self.event_log(decision.event(request))
            acceptor.reject(decision.status, decision.reason)
            return
        self.hop.take_tunnel(acceptor.accept(), decision)

    # ---- the hand-over ------------------------------------------------------------------------------------

    def _hand_off(self, client: _Client, protocol: Protocol, prefix: bytes, eof: bool) -> None:
        transport = client.transport
        if not isinstance(transport, TunnelTransport):  # (a plain TCP client of a hop's own listener)
            client.close()
            return
        self.handed_open += 1
        self.hop.loop.create_task(self._relay_to_trio(transport.detach(), client.info, protocol, prefix, eof))

    async def _relay_to_trio(self, end: TunnelEnd, info: ClientInfo, protocol: Protocol, prefix: bytes,
                             eof: bool) -> None:
        ours, theirs = socket.socketpair()
        try:
            try:
                plain = await open_end(ours)
            except OSError:
                ours.close()
                theirs.close()
                end.abort()
                return
            splice = Splice(end, plain)
            if eof:
                splice.ended(0)  # (the client's end came before the hand-over)
            self.engine.to_trio_soon(self._serve_handed, theirs, info, protocol, prefix)
            try:
                await splice.done
            except asyncio.CancelledError:
                end.abort()
                plain.abort()
                raise
        finally:
            self.handed_open -= 1
            self._check_done()

    def _serve_handed(self, sock: socket.socket, info: ClientInfo, protocol: Protocol, prefix: bytes) -> None:
        """(trio's thread) Serve the handed-over connection on trio, or close it when the inbound is gone."""
        if self._nursery is None:
            sock.close()
            return
        self._nursery.start_soon(self._handed, sock, info, protocol, prefix)

    async def _handed(self, sock: socket.socket, info: ClientInfo, protocol: Protocol, prefix: bytes) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        try:
            await self.proxy.serve_detected(stream, info, protocol, prefix)
        except Exception:  # one connection's failure is not the listener's
            log.exception("a connection handed to trio failed")
        finally:
            await trio.aclose_forcefully(stream)
