"""An asyncio event loop on a thread of its own, for synchronous callers of the asyncio servers (the
control plane, the CA's gRPC server): tests, benchmarks, small tools.

    loop = LoopThread("ca")
    port = loop.run(server.start("127.0.0.1:0"))   # a coroutine run on the loop: its result, or it raises
    value = loop.call(lambda: server.port)          # read state on the loop's thread
    loop.run(server.stop(None))
    loop.close()                                     # stops the loop and joins the thread
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float | None = 10.0) -> T:
    """Run `fn()` on the asyncio `loop` (from another thread) and return what it returns."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return future.result(timeout)


class LoopThread:
    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float | None = 10.0) -> T:
        """`fn()` on the loop's thread (state the loop owns is read safely there)."""
        return call_on_loop(self._loop, fn, timeout)

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop (tasks still running are cancelled) and join its thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:  # what asyncio.run does on the way out
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()
