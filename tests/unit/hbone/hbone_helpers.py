"""Helpers shared by the HBONE tests (imported by name: this directory is on sys.path)."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TypeVar

import trio

from ca.authority import CertificateAuthority
from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import HboneError
from mesh.hbone.events import Event
from mesh.hbone.server import Handler, HboneServerConnection, serve_hbone
from mesh.hbone.sides import HboneClient, HboneServer
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context, server_context

T = TypeVar("T")
Mint = Callable[[SpiffeId], Svid]


def mint_from(authority: CertificateAuthority) -> Mint:
    """SVIDs signed by `authority` (the CA's own signing core, no gRPC round trip)."""

    def mint(identity: SpiffeId) -> Svid:
        key = generate_key()
        issued = authority.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1))
        return accept_issued(issued.pems, key, identity, load_trust_bundle(authority.root_pem))

    return mint


SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
WEB = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/web")
INTRUDER = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/intruder")
FOREIGN = SpiffeId.parse("spiffe://other.example/ns/prod/sa/web")


@dataclass
class Pair:
    """A client and a server core wired back to back: `pump()` moves bytes until both are quiet."""

    client: HboneClient
    server: HboneServer

    @classmethod
    def make(cls, client_config: HboneConfig | None = None, server_config: HboneConfig | None = None) -> Pair:
        pair = cls(HboneClient(client_config), HboneServer(server_config))
        pair.pump()
        return pair

    def pump(self, *, client_reads: bool = True) -> tuple[list[Event], list[Event]]:
        """Exchange bytes until neither side has any to send.  Returns (client events, server events).
        With `client_reads=False` the client's received bytes are delivered but not acknowledged (the
        caller does that), like a slow reader."""
        client_events: list[Event] = []
        server_events: list[Event] = []
        for _ in range(10_000):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return client_events, server_events
            if to_server:
                server_events += self.server.receive_data(to_server)
            if to_client:
                client_events += self.client.receive_data(to_client)
        raise AssertionError("the two sides never went quiet")


def of_type(events: list[Event], kind: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, kind)]


@dataclass
class Tls:
    """Client and server contexts for two identities from the same CA."""

    client: ssl.SSLContext
    server: ssl.SSLContext


def tls_for(client_svid: Svid, server_svid: Svid) -> Tls:
    return Tls(client_context(client_svid), server_context(server_svid))


@asynccontextmanager
async def hbone_server(
    ctx: ssl.SSLContext, handler: Handler, *, config: HboneConfig | None = None
) -> AsyncIterator[tuple[int, list[HboneServerConnection]]]:
    """An HBONE server on 127.0.0.1 (random port); yields the port and the list of its connections."""
    connections: list[HboneServerConnection] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _serve(ctx, handler, config, connections, nursery), 0)
        port = listeners[0].socket.getsockname()[1]
        yield port, connections
        nursery.cancel_scope.cancel()


def _serve(
    ctx: ssl.SSLContext,
    handler: Handler,
    config: HboneConfig | None,
    connections: list[HboneServerConnection],
    nursery: trio.Nursery,
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def on_connection(tcp: trio.SocketStream) -> None:
        tls = trio.SSLStream(tcp, ctx, server_side=True)
        async with trio.open_nursery() as inner:
            try:
                conn = await inner.start(serve_hbone_noraise, tls, handler, config)
            except RuntimeError:  # the handshake failed: nothing to serve
                return
            connections.append(conn)

    return on_connection


async def serve_hbone_noraise(
    tls: trio.SSLStream[trio.abc.Stream],
    handler: Handler,
    config: HboneConfig | None,
    task_status: trio.TaskStatus[HboneServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    with suppress(HboneError):
        await serve_hbone(tls, handler, config=config, task_status=task_status)


async def echo_handler(request, acceptor) -> None:  # type: ignore[no-untyped-def]
    """Accept every CONNECT and echo bytes back, half-closing when the client does."""
    tunnel = await acceptor.accept()
    while data := await tunnel.receive_some(65536):
        await tunnel.send_all(data)
    await tunnel.send_eof()
