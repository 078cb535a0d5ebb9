"""A mesh around the waypoint on 127.0.0.1 for its HBONE tests: a real CA (gRPC, TLS), SVIDs minted from
it, a small HBONE server standing in for an endpoint's node agent, and an HBONE client standing in for a
source node agent.  Imported by name (this directory is on sys.path)."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from ca.auth import NodeTokenIssuer
from ca.authority import CertificateAuthority
from ca.pods import InMemoryPodLocator
from ca.server import start_ca_server
from mesh.hbone.errors import HboneError
from mesh.hbone.pool import HbonePool, tcp_connect
from mesh.hbone.server import InboundRequest, TunnelAcceptor, serve_hbone
from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.manager import SecretManager
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle
from mesh.secrets.tls import client_context, server_context

TD = "cluster.local"
WAYPOINT_ID = SpiffeId(TD, "bookinfo", "waypoint")
SLEEP_ID = SpiffeId(TD, "bookinfo", "sleep")
REVIEWS_ID = SpiffeId(TD, "bookinfo", "bookinfo-reviews")
RATINGS_ID = SpiffeId(TD, "bookinfo", "bookinfo-ratings")


@dataclass
class MeshCA:
    """A CA served over gRPC (as the control plane serves it) plus direct minting for the other parties."""

    authority: CertificateAuthority
    issuer: NodeTokenIssuer
    address: str
    root_pem: bytes

    def mint(self, identity: SpiffeId) -> Svid:
        key = generate_key()
        issued = self.authority.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1))
        return accept_issued(issued.pems, key, identity, load_trust_bundle(self.authority.root_pem))

    def secret_manager(self, identity: SpiffeId) -> tuple[SecretManager, CAClient]:
        """The waypoint's own: asks the CA over gRPC with a workload token for `identity`."""
        client = CAClient(self.address, self.root_pem, self.issuer.mint_workload_token(identity), timeout=5)
        return SecretManager(client, self.root_pem, impersonate=False), client

    def client_pool(self, identity: SpiffeId) -> HbonePool:
        """An HBONE pool presenting `identity` (a source node agent)."""
        ctx = client_context(self.mint(identity))
        return HbonePool(tcp_connect, lambda _source: ctx, connect_timeout=5)


@contextmanager
def running_ca(tmp: Path) -> Iterator[MeshCA]:
    authority = CertificateAuthority.load_or_create(tmp / "ca")
    issuer = NodeTokenIssuer.generate()
    server = start_ca_server(authority, issuer.authenticator(), InMemoryPodLocator([]))
    try:
        root = server.root_pem if isinstance(server.root_pem, bytes) else server.root_pem.encode()
        yield MeshCA(authority, issuer, server.address, root)
    finally:
        server.stop(None)


@dataclass
class Seen:
    """What the fake destination agent saw of one CONNECT."""

    authority: str
    forwarded: str | None
    peer: str


@dataclass
class FakeAgent:
    """An HBONE server like a destination node agent: it refuses some ports with 401 and echoes the rest."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    deny_ports: frozenset[int] = frozenset()

    async def handler(self, request: InboundRequest, acceptor: TunnelAcceptor) -> None:
        self.seen.append(Seen(str(request.authority), request.header("forwarded"), str(request.peer)))
        if request.authority.port in self.deny_ports:
            await acceptor.reject(401, "denied by bookinfo/deny-all")
            return
        tunnel = await acceptor.accept()
        while data := await tunnel.receive_some(65536):
            await tunnel.send_all(data)
        await tunnel.send_eof()


@asynccontextmanager
async def fake_agent(ca: MeshCA, identity: SpiffeId, **kw: object) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent(**kw)  # type: ignore[arg-type]
    ctx = server_context(ca.mint(identity))

    async def on_connection(tcp: trio.SocketStream) -> None:
        with suppress(HboneError, trio.BrokenResourceError):
            await serve_hbone(trio.SSLStream(tcp, ctx, server_side=True), agent.handler, trust_domain=TD)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_connection, 0, host="127.0.0.1"))
        agent.port = listeners[0].socket.getsockname()[1]
        yield agent
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


async def start_tcp(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]] = echo,
                    host: str = "127.0.0.1") -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=host))
    return int(listeners[0].socket.getsockname()[1])


async def receive_all(stream: trio.abc.ReceiveStream, timeout: float = 5.0) -> bytes:
    out = b""
    with trio.fail_after(timeout):
        while data := await stream.receive_some(65536):
            out += data
    return out
