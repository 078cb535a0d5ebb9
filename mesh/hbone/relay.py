"""Copy bytes both ways between two trio streams until both directions end, carrying half-close.

When one side finishes sending (TCP FIN, or END_STREAM on a tunnel), the other side is half-closed
with `send_eof()` and the opposite direction goes on.  Bytes are counted each way for metrics.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import trio

from mesh.hbone.errors import HboneError

CHUNK = 256 * 1024


@dataclass(frozen=True)
class RelayResult:
    """Bytes copied from `a` to `b` and from `b` to `a`; `error` says why the relay stopped early
    (None when both directions ended cleanly)."""

    a_to_b: int
    b_to_a: int
    error: str | None = None


async def relay(a: trio.abc.Stream, b: trio.abc.Stream, *, chunk: int = CHUNK) -> RelayResult:
    """Relay until both directions have ended, then close both streams.  If either direction fails
    (reset, broken connection), the other is stopped too and both streams are closed abortively."""
    counts = [0, 0]
    errors: list[str] = []

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, index: int, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(chunk)
                if not data:
                    break
                await dst.send_all(data)
                counts[index] += len(data)
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, HboneError, OSError) as exc:
            direction = "a->b" if index == 0 else "b->a"
            errors.append(f"{direction}: {exc or type(exc).__name__}")
            scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, a, b, 0, nursery.cancel_scope)
            nursery.start_soon(copy, b, a, 1, nursery.cancel_scope)
    finally:
        if errors:
            await trio.aclose_forcefully(a)
            await trio.aclose_forcefully(b)
        else:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await _close_quietly(a)
                await _close_quietly(b)
    return RelayResult(counts[0], counts[1], errors[0] if errors else None)


async def _close_quietly(stream: trio.abc.Stream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, HboneError, OSError):
        await stream.aclose()
