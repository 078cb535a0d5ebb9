"""The data path's engine: an asyncio event loop on uvloop, in a thread of its own, beside trio.

trio supervises (discovery, certificates, admin, the pods' enrollment); the bytes of every proxied
connection move on this loop, whose per-wake-up cost is a fraction of trio's (docs/ARCHITECTURE.md,
'Performance').  The two meet only on cold paths, and only through this class:

    engine = Engine()
    await nursery.start(engine.run)                  # trio: the loop runs until the nursery is cancelled
    result = await engine.call(some_coroutine_fn, x)  # trio awaits a coroutine run on the engine
    svid = await engine.from_trio(certs.get, ident)   # the engine awaits a trio function (a certificate)
    engine.to_trio_soon(span.end)                     # the engine hands a trio-only call over, not waiting

What the engine reads of trio's objects is read-only and swapped whole (the mesh state, certificates'
contexts), and what it writes is thread-safe (Prometheus counters); everything else crosses here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import uvloop

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineError(RuntimeError):
    """The engine is not running (not started yet, or stopped)."""


class Engine:
    def __init__(self, name: str = "data-path") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None  # where trio calls asked for by the engine run
        self._thread_id = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise EngineError("the data path engine is not running: start it with nursery.start(engine.run)")
        return self._loop

    def on_engine(self) -> bool:
        """Whether the calling thread is the engine's."""
        return self._loop is not None and threading.get_ident() == self._thread_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loop in its thread until cancelled; then every task on it is cancelled and the loop
        closed (so every socket of the data path with it)."""
        started = threading.Event()
        stopped = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

        def thread_main() -> None:
            loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop, self._thread_id = loop, threading.get_ident()
            started.set()
            try:
                loop.run_forever()
                _cancel_all(loop)
            finally:
                self._loop = None
                loop.close()
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(stopped.set)  # type: ignore[union-attr]

        thread = threading.Thread(target=thread_main, name=self.name, daemon=True)
        thread.start()
        await trio.to_thread.run_sync(started.wait)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(loop.stop)
            with trio.CancelScope(shield=True):
                await stopped.wait()

    # -- trio -> engine ---------------------------------------------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the engine (from any thread), not waiting for it."""
        self.loop.call_soon_threadsafe(fn, *args)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From trio: run the coroutine `fn(*args)` on the engine and return its result (or raise its
        exception).  Cancelling the trio caller cancels the coroutine."""
        future = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        future.add_done_callback(lambda _: _soon(token, done.set))
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:  # the loop stopped under it, cancelling its tasks
            raise EngineError("the engine stopped before the call finished") from None

    # -- engine -> trio ---------------------------------------------------------------------------------

    def to_trio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the engine: run `fn(*args)` in trio's thread, not waiting for it."""
        if self._token is not None:
            _soon(self._token, fn, *args)

    def from_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """From the engine: run the trio function `fn(*args)` in trio's thread; a future of its result."""
        loop = self.loop
        future: asyncio.Future[T] = loop.create_future()

        def settle(outcome: Callable[[], None]) -> None:
            if not future.done():
                outcome()

        async def run() -> None:
            try:
                result = await fn(*args)
            except Exception as exc:  # handed to the engine's caller
                error = exc
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
            else:
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

        def start() -> None:
            if self._nursery is None:
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(EngineError("the engine is stopping")))
            else:
                self._nursery.start_soon(run)

        if self._token is None:
            future.set_exception(EngineError("the engine is not running"))
        else:
            _soon(self._token, start)
        return future


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


def _soon(token: trio.lowlevel.TrioToken, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn, *args)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())
