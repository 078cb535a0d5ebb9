"""Outbound HBONE connections pooled by (source identity, destination identity, next hop).

Many tunnels share one TLS connection; once every connection of a key carries
`max_streams_per_connection` tunnels a new one is dialled; a connection without tunnels for
`idle_timeout` seconds closes itself.  A connection that fails is dropped from the pool alone: the
others of its key, and other keys, carry on.

    pool = HbonePool(connect, manager.client_context)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        key = PoolKey(source=src_id, destination=dst_id, address=("10.244.1.5", 15008), origin=pod_uid)
        tunnel = await pool.open_tunnel(key, "10.244.1.5:8080", request_headers(forwarded_for=client))

`connect(key)` makes the TCP connection (the node agent does so inside the source pod's network
namespace with SO_MARK, using `key.origin` to find it); `tls(source)` returns the client
`ssl.SSLContext` of the source identity, fetched per connection so renewed certificates are used.

A connection is only as good as the certificates it was made with: it takes no new tunnel once the
peer's certificate has expired, nor, given `certificate(source)` (the source's current SVID), once its
own certificate expired or was replaced by a renewal (another serial).  Such a connection is drained
(GOAWAY: its tunnels finish) and a new one made with the current certificates.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from mesh.hbone.client import HboneClientConnection
from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import ConnectionNotUsableError, HandshakeError, PoolConnectError
from mesh.hbone.handshake import client_handshake
from mesh.hbone.headers import Header
from mesh.hbone.tlssocket import tls_over
from mesh.hbone.tunnel import Tunnel
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid
from mesh.secrets.x509 import Certificate

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 100
DEFAULT_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class PoolKey:
    """Which connections a tunnel may share.  `origin` is opaque to the pool and handed to `connect`
    (e.g. the source pod, whose network namespace the connection must leave from)."""

    source: SpiffeId
    destination: SpiffeId
    address: tuple[str, int]
    origin: str = ""

    def describe(self) -> str:
        host, port = self.address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{where} ({self.source} -> {self.destination})"


ConnectFn = Callable[[PoolKey], Awaitable[trio.abc.Stream]]
TlsProvider = Callable[[SpiffeId], ssl.SSLContext]
CertificateProvider = Callable[[SpiffeId], Svid | None]


@dataclass(frozen=True)
class _Credentials:
    """What a pooled connection was made with: the local certificate's serial (None: not known) and
    when the first of the two certificates expires (Unix time)."""

    serial: int | None
    expires: float

    @classmethod
    def made(cls, certificate: CertificateProvider | None, source: SpiffeId, peer_der: bytes | None) -> _Credentials:
        """What a connection just dialled for `source` was made with (peer_der: the peer's certificate)."""
        svid = certificate(source) if certificate is not None else None
        peer_expires = Certificate.from_der(peer_der).not_valid_after_utc.timestamp() if peer_der \
            else math.inf
        return cls(svid.leaf.serial_number if svid is not None else None,
                   min(peer_expires, svid.not_after if svid is not None else math.inf))


class Pooled(Protocol):
    """What the pooling rule reads of a connection, whichever engine drives it."""

    @property
    def active_tunnels(self) -> int: ...

    def can_open_tunnel(self) -> bool: ...

    def goaway(self) -> Any: ...


C = TypeVar("C", bound=Pooled)


def pick(key: PoolKey, conns: Sequence[C], credentials: Mapping[C, _Credentials],
         certificate: CertificateProvider | None, now: float, max_streams: int) -> C | None:
    """The pooling rule both engines share: the busiest connection that can take one more tunnel and
    was made with certificates still current; a connection whose certificates expired or were renewed
    is sent GOAWAY (its tunnels finish; new ones go on a connection with current certificates)."""
    if not conns:
        return None
    svid = certificate(key.source) if certificate is not None else None
    serial = svid.leaf.serial_number if svid is not None else None
    best: C | None = None
    for conn in conns:
        # The count first: it is a length, while `can_open_tunnel` asks h2, which walks every stream of the
        # connection (with thousands of tunnels over many full connections, that walk was most of the cost
        # of opening one).
        if conn.active_tunnels >= max_streams or not conn.can_open_tunnel():
            continue
        made_with = credentials.get(conn)
        if made_with is not None and (now >= made_with.expires or made_with.serial != serial):
            log.debug("retiring HBONE connection to %s: %s", key.describe(),
                      "a certificate expired" if now >= made_with.expires else "our certificate was renewed")
            conn.goaway()
            continue
        if best is None or conn.active_tunnels > best.active_tunnels:
            best = conn  # fill busy connections first, so spare ones can go idle
    return best


async def tcp_connect(key: PoolKey) -> trio.abc.Stream:
    """The plain `connect` for callers that need no namespace or socket mark."""
    return await trio.open_tcp_stream(*key.address)


class HbonePool:
    def __init__(
        self,
        connect: ConnectFn,
        tls: TlsProvider,
        *,
        config: HboneConfig | None = None,
        max_streams_per_connection: int = DEFAULT_MAX_STREAMS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = 10.0,
        certificate: CertificateProvider | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be at least 1")
        self._connect = connect
        self._tls = tls
        self._config = config or HboneConfig()
        self._max_streams = max_streams_per_connection
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._certificate = certificate
        self._clock = clock
        self._connections: dict[PoolKey, list[HboneClientConnection]] = {}
        self._credentials: dict[HboneClientConnection, _Credentials] = {}
        self._dial_locks: dict[PoolKey, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.dialled = 0  # connections made since start (for tests and metrics)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the pooled connections; runs until cancelled (then every connection is closed)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def connections(self, key: PoolKey) -> Sequence[HboneClientConnection]:
        return tuple(self._connections.get(key, ()))

    def connection_count(self) -> int:
        return sum(len(c) for c in self._connections.values())

    async def open_tunnel(self, key: PoolKey, authority: str, headers: Sequence[Header] = ()) -> Tunnel:
        """A tunnel to `authority` over a pooled connection for `key` (dialled if needed).  Raises
        `PoolConnectError` if no connection could be made, `TunnelRejected` if the server said no."""
        for _ in range(3):  # a connection may start draining between choosing it and using it
            conn = self._pick(key)
            if conn is None:
                async with self._lock(key):
                    if self._pick(key) is None:
                        await self._dial(key)
                continue
            try:
                return await conn.open_tunnel(authority, headers)
            except ConnectionNotUsableError:
                continue
        raise PoolConnectError(f"no usable HBONE connection to {key.describe()} after 3 attempts")

    async def aclose(self) -> None:
        for conns in list(self._connections.values()):
            for conn in list(conns):
                await conn.aclose()

    def _pick(self, key: PoolKey) -> HboneClientConnection | None:
        return pick(key, self._connections.get(key, ()), self._credentials, self._certificate, self._clock(),
                    self._max_streams)

    def _lock(self, key: PoolKey) -> trio.Lock:
        lock = self._dial_locks.get(key)
        if lock is None:
            lock = self._dial_locks[key] = trio.Lock()
        return lock

    async def _dial(self, key: PoolKey) -> HboneClientConnection:
        if self._nursery is None:
            raise PoolConnectError("the HBONE pool is not running: start it with nursery.start(pool.run)")
        where = key.describe()
        try:
            ctx = self._tls(key.source)
        except Exception as exc:
            raise PoolConnectError(f"no client certificate for {key.source}: {exc}") from None
        try:
            with trio.fail_after(self._connect_timeout):
                transport = await self._connect(key)
        except trio.TooSlowError:
            raise PoolConnectError(
                f"connecting to {where} timed out after {self._connect_timeout:g}s: "
                "is the destination node agent running?"
            ) from None
        except OSError as exc:
            raise PoolConnectError(
                f"connecting to {where} failed: {exc.strerror or exc}: is the destination node agent running?"
            ) from None
        tls = tls_over(transport, ctx, server_side=False)
        try:
            peer = await client_handshake(tls, {key.destination}, timeout=self._connect_timeout)
        except HandshakeError as exc:
            raise PoolConnectError(str(exc)) from None
        conn = HboneClientConnection(tls, peer=peer, config=self._config, idle_timeout=self._idle_timeout)
        self._credentials[conn] = _Credentials.made(self._certificate, key.source, tls.getpeercert(binary_form=True))
        await self._nursery.start(self._host, key, conn)
        self.dialled += 1
        return conn

    async def _host(
        self, key: PoolKey, conn: HboneClientConnection, *, task_status: trio.TaskStatus[None]
    ) -> None:
        self._connections.setdefault(key, []).append(conn)
        try:
            await conn.run(task_status=task_status)
        except Exception:  # one broken connection must not take the pool (and its other connections) down
            log.exception("HBONE connection to %s failed", key.describe())
        finally:
            self._credentials.pop(conn, None)
            conns = self._connections.get(key, [])
            if conn in conns:
                conns.remove(conn)
            if not conns:
                self._connections.pop(key, None)
                lock = self._dial_locks.get(key)
                if lock is not None and not lock.locked():
                    del self._dial_locks[key]
            log.debug("HBONE connection to %s gone: %s", key.describe(), conn.close_reason)
