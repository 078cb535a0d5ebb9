"""The one relay: copy bytes both ways between two trio streams until both directions end.

Every proxy of the mesh moves bytes with it: the node agent between a pod's connection and its
tunnel (or the application), the waypoint between a tunnel it cannot read as HTTP and an endpoint.

- Half-close: when one side finishes sending (TCP FIN, or END_STREAM on a tunnel), the other side is
  half-closed with `send_eof()` and the opposite direction goes on.
- Failure: when either direction fails (reset, broken connection), the other is stopped too and both
  streams are closed abortively; `RelayResult.error` says why and `failed` names the side that broke.
- Counting: bytes are counted each way and returned; a `counter` (the node agent's per-connection
  metrics) is also told of every chunk as it goes, so a scrape sees a long connection's bytes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

from mesh.hbone.errors import HboneError

CHUNK = 256 * 1024
RELAY_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, HboneError, OSError)

Side = Literal["a", "b"]


@dataclass(frozen=True)
class RelayResult:
    """Bytes copied from `a` to `b` and from `b` to `a`; `error` says why the relay stopped early
    (None when both directions ended cleanly) and `failed` which side's stream broke."""

    a_to_b: int
    b_to_a: int
    error: str | None = None
    failed: Side | None = None


class ByteCounter(Protocol):
    """Told of each chunk as it is copied: `a` is the client's side, so a -> b is what was received from
    it and b -> a what was sent back (the node agent's `ConnectionMetrics` is one)."""

    def add_received(self, n: int) -> None: ...

    def add_sent(self, n: int) -> None: ...


async def relay(a: trio.abc.Stream, b: trio.abc.Stream, *, chunk: int = CHUNK,
                counter: ByteCounter | None = None) -> RelayResult:
    """Relay until both directions have ended, then close both streams.  If either direction fails
    (reset, broken connection), the other is stopped too and both streams are closed abortively."""
    counts = [0, 0]
    errors: list[tuple[Side, str]] = []
    tell = (counter.add_received, counter.add_sent) if counter is not None else None

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, index: int, scope: trio.CancelScope) -> None:
        sides: tuple[Side, Side] = ("a", "b") if index == 0 else ("b", "a")
        broken = sides[0]  # the side of the call in progress: receiving from src, or sending to dst
        try:
            while True:
                data = await src.receive_some(chunk)
                if not data:
                    break
                broken = sides[1]
                await dst.send_all(data)
                broken = sides[0]
                counts[index] += len(data)
                if tell is not None:
                    tell[index](len(data))
            broken = sides[1]
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
        except RELAY_ERRORS as exc:
            errors.append((broken, f"{sides[0]}->{sides[1]}: {exc or type(exc).__name__}"))
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
    failed, error = errors[0] if errors else (None, None)
    return RelayResult(counts[0], counts[1], error, failed)


async def _close_quietly(stream: trio.abc.Stream) -> None:
    with contextlib.suppress(*RELAY_ERRORS):
        await stream.aclose()
