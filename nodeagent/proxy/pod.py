"""A pod's proxies: its three listeners inside its network namespace and the connections they take.

`PodProxy.start` (trio) opens 15001 (outbound), 15006 (plaintext inbound) and 15008 (HBONE inbound) in
the pod's namespace and serves them on the data path's engine (`mesh.hbone.engine`): the engine
accepts, and each connection is handled by a task there; `stop` closes the listeners and aborts the
pod's connections and tasks, and nothing else of the agent.

A stopping agent drains first (`drain`, then `open_connections` until none or the deadline): the
listeners close, so new connections go to its successor's listeners of the same ports (`listener_in`
shares them; what was queued migrates), the HBONE clients are told to open new tunnels elsewhere
(GOAWAY: their next tunnel dials, and reaches the successor), and what is open finishes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import trio

from mesh.hbone.aio import AioServerConnection, accept_all
from mesh.hbone.engine import Engine
from mesh.hbone.splice import PlainEnd
from nodeagent.proxy import inbound, outbound
from nodeagent.proxy.context import PodContext
from nodeagent.proxy.sockets import LISTEN_BACKLOG, listener_in, migrate_queued_connections
from nodeagent.redirect.rules import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT

log = logging.getLogger("nodeagent.pod")

ConnectionHandler = Callable[[PodContext, PlainEnd], Awaitable[None]]
PLAIN_HANDLERS: dict[int, ConnectionHandler] = {
    OUTBOUND_PORT: outbound.handle,
    INBOUND_PLAIN_PORT: inbound.handle_plaintext,
}
PORTS = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT)


class PodProxy:
    def __init__(self, ctx: PodContext) -> None:
        self.ctx = ctx
        self.listeners: dict[int, socket.socket] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._ends: set[PlainEnd] = set()
        self._hbone: set[AioServerConnection] = set()
        self._readers: list[int] = []  # listeners the engine accepts from itself (15008)
        self._draining = False
        self.companions: list[Callable[[], None]] = []  # closed with the listeners (the pod's DNS proxy)

    @property
    def engine(self) -> Engine:
        engine = self.ctx.parts.engine
        if engine is None:
            raise RuntimeError("the node agent's parts have no data path engine (AgentParts.engine)")
        return engine

    async def start(self, nursery: trio.Nursery | None = None) -> PodProxy:
        sockets: dict[int, socket.socket] = {}
        try:
            migrate_queued_connections(self.ctx.pod.netns)
            for port in PORTS:
                sockets[port] = listener_in(self.ctx.pod.netns, "0.0.0.0", port)
            await self.engine.call(self._serve, sockets)
        except BaseException:
            for s in sockets.values():
                s.close()
            raise
        self.listeners = sockets
        return self

    async def stop(self) -> None:
        self._close_companions()
        with trio.CancelScope(shield=True):
            await self.engine.call(self._stop)

    def _close_companions(self) -> None:
        for close in self.companions:
            close()
        self.companions.clear()

    async def drain(self) -> None:
        """Take no new connection; those open go on (`stop` ends them)."""
        self._close_companions()
        with trio.CancelScope(shield=True):
            await self.engine.call(self._drain)

    async def open_connections(self) -> int:
        """How many of the pod's connections are still open: plaintext ones and HBONE handshakes (a task
        each), HBONE connections (with their tunnels)."""
        return await self.engine.call(self._open_connections)

    # -- on the engine -----------------------------------------------------------------------------------

    async def _serve(self, sockets: dict[int, socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for port, sock in sockets.items():
            if port == HBONE_PORT:  # accepted here, so that nothing is read before the TLS handshake
                loop.add_reader(sock.fileno(), accept_all, sock, self._take_hbone)
                self._readers.append(sock.fileno())
                continue
            handler = PLAIN_HANDLERS[port]
            factory: Callable[[], asyncio.Protocol] = lambda handler=handler: _Accepted(self, handler)  # type: ignore[misc]  # noqa: E731
            self._servers.append(await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG))

    def _take_hbone(self, sock: socket.socket) -> None:
        self._spawn(self._run_hbone(sock))

    async def _drain(self) -> None:
        self._draining = True
        self._close_listeners()
        for conn in list(self._hbone):
            conn.goaway()  # its tunnels finish; the client opens new ones on a new connection

    async def _open_connections(self) -> int:
        return len(self._tasks) + len(self._hbone)

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._readers:
            loop.remove_reader(fd)
        self._readers.clear()
        if HBONE_PORT in self.listeners:
            self.listeners[HBONE_PORT].close()
        for server in self._servers:
            server.close()  # and its listening socket

    async def _stop(self) -> None:
        self._close_listeners()
        for task in list(self._tasks):
            task.cancel()
        for end in list(self._ends):
            end.abort()
        for conn in list(self._hbone):
            conn.close()
            if conn.transport is not None:
                conn.transport.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ctx.parts.sockets.forget(self.ctx.pod.netns)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, handler: ConnectionHandler, end: PlainEnd) -> None:
        self._ends.add(end)
        try:
            await handler(self.ctx, end)
        except (OSError, ConnectionError) as exc:
            log.debug("connection in pod %s ended: %s", self.ctx.pod.key, exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection handler failed in pod %s", self.ctx.pod.key)
        finally:
            self._ends.discard(end)
            if end.transport is not None and not end.transport.is_closing():
                end.abort()  # not relayed (refused, or the upstream failed): the client is closed

    async def _run_hbone(self, sock: socket.socket) -> None:
        conn = None
        try:
            conn = await inbound.handle_hbone(self.ctx, sock)
        except asyncio.CancelledError:
            sock.close()
        if conn is not None and not conn.finished.done():
            if self._draining:  # accepted just before the listener closed
                conn.goaway()
            self._hbone.add(conn)
            conn.finished.add_done_callback(lambda _: self._hbone.discard(conn))  # type: ignore[arg-type]


class _Accepted(PlainEnd):
    """An accepted plaintext connection (15001, 15006): handled by a task of its own on the engine."""

    def __init__(self, proxy: PodProxy, handler: ConnectionHandler) -> None:
        super().__init__()
        self._proxy = proxy
        self._handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._proxy._spawn(self._proxy._run(self._handler, self))
