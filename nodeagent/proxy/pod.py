"""A pod's proxies: its three listeners inside its network namespace and the tasks that serve them.

`PodProxy.start` opens 15001 (outbound), 15006 (plaintext inbound) and 15008 (HBONE inbound) in the
pod's namespace and serves them in a task group of its own; `stop` cancels that group, which closes the
listeners and the pod's connections, and nothing else of the agent.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from nodeagent.proxy import inbound, outbound
from nodeagent.proxy.context import SOCKET_ERRORS, PodContext
from nodeagent.proxy.sockets import listener_in
from nodeagent.redirect.rules import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT

log = logging.getLogger("nodeagent.pod")

ConnectionHandler = Callable[[PodContext, trio.SocketStream], Awaitable[None]]
HANDLERS: tuple[tuple[int, ConnectionHandler], ...] = (
    (OUTBOUND_PORT, outbound.handle),
    (INBOUND_PLAIN_PORT, inbound.handle_plaintext),
    (HBONE_PORT, inbound.handle_hbone),
)


class PodProxy:
    def __init__(self, ctx: PodContext) -> None:
        self.ctx = ctx
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self.listeners: dict[int, socket.socket] = {}

    async def start(self, nursery: trio.Nursery) -> PodProxy:
        sockets: list[tuple[socket.socket, ConnectionHandler]] = []
        try:
            for port, handler in HANDLERS:
                sockets.append((listener_in(self.ctx.pod.netns, "0.0.0.0", port), handler))
        except BaseException:
            for s, _ in sockets:
                s.close()
            raise
        self.listeners = {port: sock for (port, _), (sock, _) in zip(HANDLERS, sockets, strict=True)}
        nursery.start_soon(self._serve, sockets)
        return self

    async def _serve(self, sockets: list[tuple[socket.socket, ConnectionHandler]]) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for sock, handler in sockets:
                        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                        nursery.start_soon(self._accept, listener, handler)
        finally:
            for sock, _ in sockets:
                sock.close()
            self._done.set()

    async def _accept(self, listener: trio.SocketListener, handler: ConnectionHandler) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # e.g. EMFILE: back off rather than spin
                    log.warning("accept failed in pod %s: %s", self.ctx.pod.key, exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._run, handler, stream)

    async def _run(self, handler: ConnectionHandler, stream: trio.SocketStream) -> None:
        try:
            await handler(self.ctx, stream)
        except SOCKET_ERRORS as exc:
            log.debug("connection in pod %s ended: %s", self.ctx.pod.key, exc)
        except Exception:
            log.exception("connection handler failed in pod %s", self.ctx.pod.key)
        finally:
            await trio.aclose_forcefully(stream)

    async def stop(self) -> None:
        self._scope.cancel()
        await self._done.wait()
