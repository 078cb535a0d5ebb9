"""What every long-running data plane process does the same way: file limits, signals, exit codes."""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Awaitable, Callable

import trio

from mesh.errors import MeshError


def split_hostport(value: str) -> tuple[str, int]:
    """A listen address `HOST:PORT` (`[v6]:PORT` too; an empty host means every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise MeshError(f"{value!r} is not HOST:PORT (e.g. 0.0.0.0:15012)")
    return host.strip("[]") or "0.0.0.0", int(port)


def raise_open_files_limit() -> None:
    """A proxied connection holds two or three sockets: take the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_until_signalled(body: Callable[[trio.Event], Awaitable[None]], log: logging.Logger,
                          stopping: str) -> int:
    """Run `body(stop)` under trio until it returns; SIGTERM or SIGINT sets `stop` (the body drains
    and returns).  A `MeshError` is logged as one line and the exit status is 1."""

    async def supervised() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def run_then_stop() -> None:
                    await body(stop)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run_then_stop)
                async for _ in signals:
                    log.info("%s", stopping)
                    stop.set()
                    break
                await trio.sleep_forever()

    try:
        trio.run(supervised)
    except MeshError as exc:
        log.error("%s", exc)
        return 1
    except BaseExceptionGroup as group:  # a task of the nursery failed: one line if it was bad input
        errors = mesh_errors(group)
        if errors is None:
            raise
        for error in errors:
            log.error("%s", error)
        return 1
    return 0


def mesh_errors(group: BaseExceptionGroup[BaseException]) -> list[MeshError] | None:
    """The MeshErrors a (nested) exception group holds, or None when it holds anything else."""
    found: list[MeshError] = []
    for exc in group.exceptions:
        if isinstance(exc, MeshError):
            found.append(exc)
        elif isinstance(exc, BaseExceptionGroup):
            inner = mesh_errors(exc)
            if inner is None:
                return None
            found += inner
        else:
            return None
    return found
