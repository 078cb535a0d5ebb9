"""The HBONE server side: answer each CONNECT of an accepted TLS connection through a handler.

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        if not allowed(request.peer, request.authority):
            await acceptor.reject(401, "denied by policy")
            return
        upstream = await trio.open_tcp_stream(request.authority.host, request.authority.port)
        tunnel = await acceptor.accept()
        await relay(tunnel, upstream)

    gate = ListenerGate(ListenerLimits())               # one per listener: its caps
    await serve_hbone(ssl_stream, handler, gate=gate)   # one call per accepted TLS connection

A CONNECT the client resets before it is answered cancels its handler (and so the upstream connect in
progress); the core closes a connection that keeps doing so (`ResetBudget`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from mesh.hbone.config import HboneConfig, ListenerLimits
from mesh.hbone.errors import (
    HboneError,
    ListenerFull,
    ProtocolUsageError,
    TunnelReset,
)
from mesh.hbone.events import (
    ConnectionClosed,
    ConnectRequested,
    Event,
    StreamReset,
)
from mesh.hbone.frames import ErrorCode
from mesh.hbone.handshake import _peer_name, server_handshake
from mesh.hbone.headers import Authority, ConnectRequest, Header
from mesh.hbone.sides import HboneServer
from mesh.hbone.tlssocket import TlsSocket, take_over
from mesh.hbone.transport import _Driver
from mesh.hbone.tunnel import Tunnel
from mesh.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

log = logging.getLogger(__name__)

def certificate_hash(stream: trio.abc.Stream | TlsSocket) -> str:
    """SHA-256 of the peer's leaf certificate (DER), hex: Envoy's `Hash` in x-forwarded-client-cert.
    "" when `stream` is not TLS or the peer sent no certificate."""
    if not isinstance(stream, trio.SSLStream | TlsSocket):
        return ""
    try:
        der = stream.getpeercert(binary_form=True)
    except (ValueError, AttributeError):  # no handshake yet
        return ""
    return hashlib.sha256(der).hexdigest() if der else ""


# -- server ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboundRequest:
    """A CONNECT the handler must answer: where to (`authority`), from whom (`peer`: the client's
    verified SPIFFE identity, None when the server was started without a trust-domain check;
    `peer_certificate_hash`: the SHA-256 of its leaf certificate's DER, hex, "" without one)."""

    stream_id: int
    authority: Authority
    headers: tuple[Header, ...]
    peer: SpiffeId | None
    peer_address: str
    forwarded_for: str | None
    forwarded_host: str | None
    peer_certificate_hash: str = ""

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def baggage(self) -> str | None:
        return self.header("baggage")

    @property
    def traceparent(self) -> str | None:
        return self.header("traceparent")


class TunnelAcceptor:
    """The handler's answer to one CONNECT: `accept()` (200) once the upstream is connected, or
    `reject(status, reason)`: 401 denied by policy, 503 upstream unreachable, 400 bad request."""

    def __init__(self, driver: HboneServerConnection, tunnel: Tunnel) -> None:
        self._driver = driver
        self._tunnel = tunnel
        self.decided = False

    async def accept(self) -> Tunnel:
        self._decide()
        self._driver.proto.accept(self._tunnel.stream_id)
        self._driver.kick()
        await trio.lowlevel.checkpoint()
        return self._tunnel

    async def reject(self, status: int, reason: str = "") -> None:
        self._decide()
        self._driver._dispatch(self._driver.proto.reject(self._tunnel.stream_id, status, reason))
        self._driver.release(self._tunnel)
        await trio.lowlevel.checkpoint()

    def _decide(self) -> None:
        if self.decided:
            raise ProtocolUsageError("this CONNECT was already answered")
        if self._tunnel._error is not None:
            raise TunnelReset(
                f"CONNECT {self._tunnel.authority} was cancelled by the client: {self._tunnel._error}"
            )
        self.decided = True
        self._driver._answered(self._tunnel.stream_id)


Handler = Callable[[InboundRequest, TunnelAcceptor], Awaitable[None]]


class HboneServerConnection(_Driver):
    """One inbound HBONE connection: runs `handler` in its own task for every well-formed CONNECT."""

    proto: HboneServer

    def __init__(
        self,
        stream: trio.abc.Stream | TlsSocket,
        handler: Handler,
        *,
        peer: SpiffeId | None,
        config: HboneConfig | None = None,
    ) -> None:
        super().__init__(HboneServer(config, now=trio.current_time()), stream, peer)
        self._handler = handler
        self._peer_address = _peer_name(stream) if isinstance(stream, trio.SSLStream | TlsSocket) else "?"
        self._peer_hash = certificate_hash(stream)
        self._unanswered: dict[int, trio.CancelScope] = {}  # handlers of CONNECTs not answered yet

    def _handle(self, event: Event) -> None:
        if isinstance(event, StreamReset):
            scope = self._unanswered.pop(event.stream_id, None)
            if scope is not None:  # the client gave up: stop connecting upstream for it
                scope.cancel()
        elif isinstance(event, ConnectionClosed):
            for scope in self._unanswered.values():
                scope.cancel()
            self._unanswered.clear()
        super()._handle(event)

    def _answered(self, stream_id: int) -> None:
        self._unanswered.pop(stream_id, None)

    def _on_connect_requested(self, event: ConnectRequested) -> None:
        if self._nursery is None:
            self._dispatch(self.proto.reset(event.stream_id, ErrorCode.REFUSED_STREAM))
            return
        request: ConnectRequest = event.request
        tunnel = Tunnel(self, event.stream_id, str(request.authority))
        self._tunnels[event.stream_id] = tunnel
        info = InboundRequest(
            stream_id=event.stream_id,
            authority=request.authority,
            headers=request.headers,
            peer=self.peer,
            peer_address=self._peer_address,
            forwarded_for=request.forwarded_for,
            forwarded_host=request.forwarded_host,
            peer_certificate_hash=self._peer_hash,
        )
        scope = self._unanswered[event.stream_id] = trio.CancelScope()
        self._nursery.start_soon(self._run_handler, info, TunnelAcceptor(self, tunnel), tunnel, scope)

    async def _run_handler(self, info: InboundRequest, acceptor: TunnelAcceptor, tunnel: Tunnel,
                           scope: trio.CancelScope) -> None:
        try:
            with scope:
                if not scope.cancel_called:  # reset in the same read as its HEADERS: never started
                    await self._handler(info, acceptor)
            if scope.cancelled_caught:
                log.debug("HBONE CONNECT %s from %s: reset by the client before its answer", info.authority,
                          info.peer)
        except (HboneError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("HBONE tunnel to %s from %s ended: %s", info.authority, info.peer, exc)
            self._answer_if_undecided(acceptor, 503, f"upstream failed: {exc}")
        except Exception:
            log.exception("HBONE handler failed for CONNECT %s from %s", info.authority, info.peer)
            self._answer_if_undecided(acceptor, 503, "internal error in the HBONE server")
        else:
            self._answer_if_undecided(acceptor, 503, "the server did not answer this CONNECT")
        finally:
            self._unanswered.pop(info.stream_id, None)
            if not tunnel._closed:
                with trio.CancelScope(shield=True):
                    await tunnel.aclose()

    def _answer_if_undecided(self, acceptor: TunnelAcceptor, status: int, reason: str) -> None:
        if acceptor.decided or acceptor._tunnel._error is not None:
            return
        acceptor.decided = True
        try:
            self._dispatch(self.proto.reject(acceptor._tunnel.stream_id, status, reason))
        except HboneError:
            return
        self.kick()


async def serve_hbone(
    stream: trio.SSLStream[trio.abc.Stream],
    handler: Handler,
    *,
    trust_domain: str | None = DEFAULT_TRUST_DOMAIN,
    config: HboneConfig | None = None,
    handshake_timeout: float = 10.0,
    gate: ListenerGate | None = None,
    task_status: trio.TaskStatus[HboneServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one accepted TLS connection (handshake not yet done) until it closes.  Over a plain TCP
    `trio.SocketStream` the connection takes the socket over and runs TLS on it (`TlsSocket`); closing
    `stream` afterwards is harmless.

    The client must present an SVID of `trust_domain` (else `HandshakeError`, the stream closed);
    its identity is `InboundRequest.peer`.  `handler(request, acceptor)` runs once per CONNECT in its
    own task; when it returns the tunnel is closed, so relay inside it.  An exception in a handler is
    logged and costs that tunnel only (503 if it was not answered yet).  `gate`: the listener's caps;
    a connection over its cap is closed at once (`ListenerFull`)."""
    if gate is not None and not gate.enter():
        await trio.aclose_forcefully(stream)
        raise ListenerFull(f"refused a connection from {_peer_name(stream)}: {gate.limits.max_connections} "
                           "connections are open on this HBONE listener, its cap")
    try:
        tls = take_over(stream)  # over TCP: TLS on the socket itself, driven by trio's readiness waits
        peer = await server_handshake(tls, trust_domain, timeout=handshake_timeout,
                                      slots=gate.handshakes if gate is not None else None)
        conn = HboneServerConnection(tls, handler, peer=peer, config=config)
        task_status.started(conn)
        await conn.run()
    finally:
        if gate is not None:
            gate.leave()


class ListenerGate:
    """The caps of one HBONE listener (`ListenerLimits`), shared by all its connections: how many are
    open, how many are in their TLS handshake.  `serve_hbone` (and the engine's `aio.serve_tls`) enters
    and leaves it."""

    def __init__(self, limits: ListenerLimits | None = None) -> None:
        self.limits = limits or ListenerLimits()
        self.handshakes = trio.CapacityLimiter(self.limits.max_handshakes)
        self.engine_handshakes: Any = None  # the same cap on the engine (an asyncio.Semaphore made there)
        self.connections = 0  # open now
        self.refused = 0  # closed at once for being over the cap, since start

    def enter(self) -> bool:
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            return False
        self.connections += 1
        return True

    def leave(self) -> None:
        self.connections -= 1
