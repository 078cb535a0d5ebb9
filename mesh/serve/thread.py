"""The same trio server for a process whose own loop is not trio: the control plane runs grpc.aio on
asyncio, so its HTTP endpoints run in a thread of their own.

    servers = ServerThread("controlplane-http")
    servers.tcp(router, "0.0.0.0", 15014, name="metrics").unix(router, home / "debug.sock", name="debug")
    metrics_port, _ = servers.start()      # bound; serving until servers.stop()

Handlers run in trio's worker threads, so one that blocks (an apply waiting for the store's lock)
holds up no other request.  They must only read state that is safe to read from any thread (the
prometheus registry, a store behind its lock); state an asyncio loop owns is read on that loop with
`call_on_loop(loop, fn)`.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from mesh.serve.errors import ServeError
from mesh.serve.routes import Handler
from mesh.serve.server import MAX_BODY, serve_http, serve_unix

T = TypeVar("T")


class ServerThread:
    """Servers (`tcp`, `unix`) on one trio loop in a daemon thread; `start()` returns once they listen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[int | str] = []  # bound port or socket path of each server, in order
        self._servers: list[Callable[..., Awaitable[None]]] = []
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def tcp(self, handler: Handler, host: str, port: int, *, name: str, max_body: int = MAX_BODY,
            tls: ssl.SSLContext | None = None, netns: str | None = None) -> ServerThread:
        """Serve `handler` on TCP (HTTPS when `tls` is given; listening inside network namespace `netns`
        when given)."""
        self._servers.append(functools.partial(serve_http, handler, host, port, name=name, max_body=max_body,
                                               in_thread=True, tls=tls, netns=netns))
        return self

    def unix(self, handler: Handler, path: Path | str, *, name: str, mode: int = 0o600,
             max_body: int = MAX_BODY) -> ServerThread:
        self._servers.append(functools.partial(serve_unix, handler, path, name=name, mode=mode, max_body=max_body,
                                               in_thread=True))
        return self

    def start(self, timeout: float = 10.0) -> list[int | str]:
        """Bind every server and serve in the thread; raises `ListenError` if one cannot listen."""
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ServeError(f"the {self.name} servers did not start within {timeout:g}s")
        if self._error is not None:
            raise self._error
        return list(self.addresses)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (requests in flight are cut off), join the thread, remove socket files."""
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._scope.cancel)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._token = trio.lowlevel.current_trio_token()
            self._scope = nursery.cancel_scope
            for server in self._servers:
                address: Any = await nursery.start(server)
                self.addresses.append(address)
            self._ready.set()
