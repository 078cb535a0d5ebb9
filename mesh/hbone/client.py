"""HBONE client connections: one TLS connection to a destination, many tunnels over it.

    async with trio.open_nursery() as nursery:
        conn = await open_hbone_connection(nursery, tcp_stream, client_ctx, expected={server_id})
        tunnel = await conn.open_tunnel("10.244.1.5:8080", request_headers(forwarded_for="10.244.0.7:4711"))
        result = await relay(app_stream, tunnel)       # raises TunnelRejected on 401/503 etc.

`mesh.hbone.pool` keeps these per (source, destination, next hop).  A CONNECT the server did not process
(reset REFUSED_STREAM: it crossed the server's GOAWAY, RFC 9113 section 8.7) raises
`ConnectionNotUsableError`, so the pool opens it once more on another connection, as the engine's
client (`mesh.hbone.aio`) does.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Collection, Sequence

import trio

from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import (
    ConnectionNotUsableError,
    TunnelRejected,
    TunnelReset,
    TunnelTimeout,
)
from mesh.hbone.events import (
    Event,
    StreamRejected,
    StreamReset,
)
from mesh.hbone.frames import ErrorCode
from mesh.hbone.handshake import client_handshake
from mesh.hbone.headers import Header
from mesh.hbone.sides import HboneClient
from mesh.hbone.tlssocket import TlsSocket, tls_over
from mesh.hbone.transport import _Driver
from mesh.hbone.tunnel import Tunnel
from mesh.identity import SpiffeId

log = logging.getLogger(__name__)

# -- client ----------------------------------------------------------------------------------------------


class HboneClientConnection(_Driver):
    """One outbound HBONE connection: call `run` in a nursery (or use `open_hbone_connection`), then
    `open_tunnel` as often as needed.  With `idle_timeout`, it closes itself after that long without
    tunnels."""

    proto: HboneClient

    def __init__(
        self,
        stream: trio.abc.Stream | TlsSocket,
        *,
        peer: SpiffeId | None,
        config: HboneConfig | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(HboneClient(config, now=trio.current_time()), stream, peer)
        self.idle_timeout = idle_timeout
        self._idle_since: float | None = trio.current_time()
        self._refused: set[int] = set()  # CONNECTs reset REFUSED_STREAM before an answer: safe to send elsewhere

    @property
    def active_tunnels(self) -> int:
        return self.proto.active_streams

    def can_open_tunnel(self) -> bool:
        return self._nursery is not None and self.proto.can_open_stream()

    async def open_tunnel(self, authority: str, headers: Sequence[Header] = ()) -> Tunnel:
        """CONNECT to `authority` ("ip:port"); returns the tunnel once the server answered 200.
        Raises `TunnelRejected` (with `.status`) for any other answer, `TunnelReset` if the stream or
        connection failed first, `TunnelTimeout` if no answer came within the config's `answer_timeout`
        (the stream is reset), `ConnectionNotUsableError` if this connection takes no new tunnels."""
        if self._nursery is None:
            raise ConnectionNotUsableError("the HBONE connection is not running (or already closed)")
        stream_id = self.proto.open_stream(authority, headers)
        tunnel = Tunnel(self, stream_id, authority)
        self._tunnels[stream_id] = tunnel
        self._idle_since = None
        self.kick()
        timeout = self.proto.config.answer_timeout
        try:
            with trio.fail_after(timeout):
                while tunnel._answer is None and tunnel._error is None:
                    await tunnel._lot.park()
        except trio.TooSlowError:
            self._dispatch(self.proto.reset(stream_id, ErrorCode.CANCEL))
            self.release(tunnel)
            self._refused.discard(stream_id)
            raise TunnelTimeout(
                f"CONNECT {authority} got no answer from {self._name()} within {timeout:g}s: is the "
                "destination (its node agent, or the application behind it) overloaded?"
            ) from None
        except BaseException:
            self._dispatch(self.proto.reset(stream_id, ErrorCode.CANCEL))
            self.release(tunnel)
            self._refused.discard(stream_id)
            raise
        answer = tunnel._answer
        refused = stream_id in self._refused
        self._refused.discard(stream_id)
        if isinstance(answer, StreamRejected):
            raise TunnelRejected(authority, answer.status, answer.reason)
        if answer is None:
            self.release(tunnel)
            if refused:  # the pool opens it on another connection
                raise ConnectionNotUsableError(f"{self._name()} refused CONNECT {authority} unprocessed: {tunnel._error}")
            raise TunnelReset(f"CONNECT {authority} failed before an answer: {tunnel._error}")
        return tunnel

    def _handle(self, event: Event) -> None:
        if isinstance(event, StreamReset) and event.error_code == ErrorCode.REFUSED_STREAM:
            tunnel = self._tunnels.get(event.stream_id)
            if tunnel is not None and tunnel._answer is None:
                self._refused.add(event.stream_id)
        super()._handle(event)

    def _on_tunnel_gone(self) -> None:
        if not self._tunnels and self.proto.active_streams == 0:
            self._idle_since = trio.current_time()

    def _next_deadline(self) -> float:
        deadline = super()._next_deadline()
        if self.idle_timeout is not None and self._idle_since is not None:
            deadline = min(deadline, self._idle_since + self.idle_timeout)
        return deadline

    def _on_timer(self, now: float) -> None:
        if self.idle_timeout is None or self._idle_since is None:
            return
        if self.proto.active_streams == 0 and now >= self._idle_since + self.idle_timeout:
            log.debug("closing HBONE connection to %s: idle for %.1fs", self._name(), now - self._idle_since)
            self._idle_since = None
            self._dispatch(self.proto.goaway())


async def open_hbone_connection(
    nursery: trio.Nursery,
    transport: trio.abc.Stream,
    ssl_context: ssl.SSLContext,
    *,
    expected: Collection[SpiffeId],
    config: HboneConfig | None = None,
    idle_timeout: float | None = None,
    handshake_timeout: float = 10.0,
) -> HboneClientConnection:
    """TLS over `transport` (a connected TCP stream, whose socket the connection takes over), check the
    server is one of `expected`, and start the HBONE connection in `nursery`."""
    tls = tls_over(transport, ssl_context, server_side=False)
    peer = await client_handshake(tls, expected, timeout=handshake_timeout)
    conn = HboneClientConnection(tls, peer=peer, config=config, idle_timeout=idle_timeout)
    await nursery.start(conn.run)
    return conn
