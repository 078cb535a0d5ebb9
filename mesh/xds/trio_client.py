"""The discovery client for trio code.

The client is synchronous (`mesh.grpcwire`), so `XdsClient` runs on its own thread and hands each
response to trio: the handler (sync or async) runs *in trio* and decides (raise to NACK); accepted
updates are then sent down a memory channel.

    async with open_xds_client(config, handler=apply_update) as client:
        await client.wait_synced()
        async for update in client.updates:     # optional: watch accepted updates
            ...

The thread waits for trio to decide, so a response is ACKed only after the handler accepted it.  When
nobody reads `updates` and its buffer is full, the client stops ACKing until someone does.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from google.protobuf.message import Message

from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.client_state import Update

TrioHandler = Callable[[Update], Awaitable[None] | None]


class TrioXdsClient:
    def __init__(self, client: XdsClient, updates: trio.MemoryReceiveChannel[Update]) -> None:
        self.client = client
        self.updates = updates

    @property
    def connected(self) -> bool:
        return self.client.connected

    def resources(self, type_url: str) -> dict[str, Message]:
        return self.client.resources(type_url)

    async def wait_synced(self, timeout: float = 30.0) -> bool:
        return await trio.to_thread.run_sync(self.client.wait_synced, timeout, abandon_on_cancel=True)


@asynccontextmanager
async def open_xds_client(
    config: ClientConfig, handler: TrioHandler | None = None, buffer: int = 1024
) -> AsyncIterator[TrioXdsClient]:
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[Update](buffer)

    async def decide(update: Update) -> None:
        if handler is not None:
            result = handler(update)
            if inspect.isawaitable(result):
                await result
        await send.send(update)

    def on_update(update: Update) -> None:  # on the client's thread
        trio.from_thread.run(decide, update, trio_token=token)

    client = XdsClient(config, on_update)
    client.start()
    try:
        async with send, receive:
            yield TrioXdsClient(client, receive)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(client.stop)
