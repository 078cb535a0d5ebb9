"""The request body kept for retries: sent again whole while within the bound, once when past it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from waypoint.errors import HttpError
from waypoint.upstream.forward import Record, RequestBody


class _Source:
    """A client's body: its chunks, counting reads."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.reads = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


async def _all(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


def test_a_kept_body_is_sent_again_whole() -> None:
    async def main() -> None:
        body = RequestBody(_Source(b"ab", b"cd"), 1024, Record())
        await body.prepare()
        assert await _all(body.chunks()) == [b"ab", b"cd"] == await _all(body.chunks())

    trio.run(main)


def test_an_empty_body_read_to_its_end_goes_out_as_nothing() -> None:
    async def main() -> None:
        source = _Source()
        body = RequestBody(source, 1024, Record())
        await body.prepare()
        assert body.complete and source.reads == 1
        assert await _all(body.chunks()) == []

    trio.run(main)


def test_a_body_past_the_bound_goes_out_once_even_when_it_has_ended() -> None:
    async def main() -> None:
        body = RequestBody(_Source(b"x" * 10, b"y" * 10), 15, Record())
        await body.prepare()
        assert body.overflowed and not body.replayable
        async with trio.open_nursery() as n:
            n.start_soon(body.pump)
            assert await _all(body.chunks()) == [b"x" * 10, b"y" * 10]
        assert body.complete and not body.resendable
        with pytest.raises(HttpError, match="already sent"):
            await _all(body.chunks())

    trio.run(main)
