"""The HBONE server side: answer each CONNECT of an accepted TLS connection through a handler.

    async def handler(request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        if not allowed(request.peer, request.authority):
            await acceptor.reject(401, "denied by policy")
            return
        upstream = await trio.open_tcp_stream(request.authority.host, request.authority.port)
        tunnel = await acceptor.accept()
        await relay(tunnel, upstream)

    await serve_hbone(ssl_stream, handler)              # one call per accepted TLS connection
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import (
    HboneError,
    ProtocolUsageError,
    TunnelReset,
)
from mesh.hbone.events import (
    ConnectRequested,
)
from mesh.hbone.frames import ErrorCode
from mesh.hbone.headers import Authority, ConnectRequest, Header
from mesh.hbone.sides import HboneServer
from mesh.hbone.transport import Tunnel, _Driver, _peer_name, server_handshake
from mesh.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

log = logging.getLogger(__name__)

# -- server ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboundRequest:
    """A CONNECT the handler must answer: where to (`authority`), from whom (`peer`: the client's
    verified SPIFFE identity, None when the server was started without a trust-domain check)."""

    stream_id: int
    authority: Authority
    headers: tuple[Header, ...]
    peer: SpiffeId | None
    peer_address: str
    forwarded_for: str | None
    forwarded_host: str | None

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


Handler = Callable[[InboundRequest, TunnelAcceptor], Awaitable[None]]


class HboneServerConnection(_Driver):
    """One inbound HBONE connection: runs `handler` in its own task for every well-formed CONNECT."""

    proto: HboneServer

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        *,
        peer: SpiffeId | None,
        config: HboneConfig | None = None,
    ) -> None:
        super().__init__(HboneServer(config, now=trio.current_time()), stream, peer)
        self._handler = handler
        self._peer_address = _peer_name(stream) if isinstance(stream, trio.SSLStream) else "?"

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
        )
        self._nursery.start_soon(self._run_handler, info, TunnelAcceptor(self, tunnel), tunnel)

    async def _run_handler(self, info: InboundRequest, acceptor: TunnelAcceptor, tunnel: Tunnel) -> None:
        try:
            await self._handler(info, acceptor)
        except (HboneError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("HBONE tunnel to %s from %s ended: %s", info.authority, info.peer, exc)
            self._answer_if_undecided(acceptor, 503, f"upstream failed: {exc}")
        except Exception:
            log.exception("HBONE handler failed for CONNECT %s from %s", info.authority, info.peer)
            self._answer_if_undecided(acceptor, 503, "internal error in the HBONE server")
        else:
            self._answer_if_undecided(acceptor, 503, "the server did not answer this CONNECT")
        finally:
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
    task_status: trio.TaskStatus[HboneServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one accepted TLS connection (handshake not yet done) until it closes.

    The client must present an SVID of `trust_domain` (else `HandshakeError`, the stream closed);
    its identity is `InboundRequest.peer`.  `handler(request, acceptor)` runs once per CONNECT in its
    own task; when it returns the tunnel is closed, so relay inside it.  An exception in a handler is
    logged and costs that tunnel only (503 if it was not answered yet)."""
    peer = await server_handshake(stream, trust_domain, timeout=handshake_timeout)
    conn = HboneServerConnection(stream, handler, peer=peer, config=config)
    task_status.started(conn)
    await conn.run()
