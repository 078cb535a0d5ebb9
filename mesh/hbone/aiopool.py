"""The HBONE pool on the engine: what `mesh.hbone.pool.HbonePool` is for trio, with the same rules.

Connections are keyed by `PoolKey` (source identity, destination identity, next hop, origin); a tunnel
goes on the busiest connection of its key that takes one more (up to `max_streams_per_connection`),
else a new connection is dialled (one dial at a time per key); a connection without tunnels for
`idle_timeout` closes itself; one that fails leaves the pool alone.  A connection is only as good as
its certificates: once the peer's has expired, or ours expired or was renewed (another serial, from
`certificate(source)`), it takes no new tunnel and is drained (GOAWAY).

`warm(key)` dials a connection for a key before its first tunnel needs it (the node agent pre-warms the
connections a newly enrolled pod is likely to use first).

`connect(key)` (a coroutine on the engine) returns a connected, non-blocking socket: the node agent
makes it inside the source pod's network namespace with SO_MARK.  `tls(source)` is the client
`ssl.SSLContext` of the source identity, asked per connection so that renewals are picked up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

from mesh.hbone.aio import AioClientConnection, SendsAhead, TunnelEnd, dial
from mesh.hbone.config import HboneConfig
from mesh.hbone.errors import ConnectionNotUsableError, HandshakeError, PoolConnectError
from mesh.hbone.headers import Header
from mesh.hbone.pool import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_STREAMS,
    CertificateProvider,
    PoolKey,
    TlsProvider,
    _Credentials,
    pick,
)

log = logging.getLogger(__name__)

AioConnectFn = Callable[[PoolKey], Awaitable[socket.socket]]


async def sock_connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect the non-blocking `sock` to the numeric `address` on the running loop.  uvloop's own
    `sock_connect` passes even a numeric address through `getaddrinfo` in its thread pool: a hand-off to
    a thread and back for every connection (~95 against ~47 us of CPU a connect on loopback).  Raises
    the connect's `OSError` (`ConnectionRefusedError`, ...); a cancelled wait leaves the socket to the
    caller, as `sock_connect` does."""
    if not begin_connect(sock, address):
        await finish_connect(sock, address)


def begin_connect(sock: socket.socket, address: tuple[str, int]) -> bool:
    """Start connecting the non-blocking `sock` to `address`: True when it is connected already, else
    `finish_connect` waits for it.  Raises the connect's `OSError` when it failed at once.

    A connect to an address of this host (the destination agent's to the application) has usually
    finished within the call, the loopback's handshake run in it, though the call said EINPROGRESS: one
    `getpeername` finds that out and spares the wait (a loop turn, and the registration of the socket with
    the loop and its removal: 42 -> 35 us a connect, accept and close on loopback, measured hot), and a
    caller's timeout for the wait need not be set up at all."""
    err = sock.connect_ex(address)
    if err == 0:
        return True
    if err not in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")
    try:
        sock.getpeername()
    except OSError:
        return False  # not connected yet (or failed: SO_ERROR says which, once it is writable)
    return True


async def finish_connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Wait until the connect `begin_connect` started is done; its `OSError` if it failed."""
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def tcp_connect(key: PoolKey) -> socket.socket:
    """The plain `connect` for callers that need no namespace or socket mark."""
    sock = socket.socket(socket.AF_INET6 if ":" in key.address[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await sock_connect(sock, key.address)
    except BaseException:
        sock.close()
        raise
    return sock


class AioPool:
    def __init__(
        self,
        connect: AioConnectFn,
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
        self._connections: dict[PoolKey, list[AioClientConnection]] = {}
        self._credentials: dict[AioClientConnection, _Credentials] = {}
        self._dial_locks: dict[PoolKey, asyncio.Lock] = {}
        self._warming: set[PoolKey] = set()  # keys a pre-warm is dialling
        self.dialled = 0

    def connections(self, key: PoolKey) -> Sequence[AioClientConnection]:
        return tuple(self._connections.get(key, ()))

    def connection_count(self) -> int:
        """(Read from trio's thread too, for metrics: a snapshot of the lists first.)"""
        return sum(map(len, list(self._connections.values())))

    async def open_tunnel(self, key: PoolKey, authority: str, headers: Sequence[Header] = (),
                          ahead: SendsAhead | None = None) -> TunnelEnd:
        """A tunnel to `authority` over a pooled connection for `key` (dialled if needed), `ahead`'s
        bytes sent as early data (`AioClientConnection.open_tunnel`).  Raises `PoolConnectError` if no
        connection could be made, `TunnelRejected` if the server said no."""
        for _ in range(3):  # a connection may start draining between choosing it and using it
            conn = self._pick(key)
            if conn is None:
                lock = self._dial_locks.get(key)
                if lock is None:
                    lock = self._dial_locks[key] = asyncio.Lock()
                async with lock:
                    if self._pick(key) is None:
                        await self._dial(key)
                continue
            try:
                return await conn.open_tunnel(authority, headers, ahead)
            except ConnectionNotUsableError:
                continue
        raise PoolConnectError(f"no usable HBONE connection to {key.describe()} after 3 attempts")

    async def warm(self, key: PoolKey) -> bool:
        """Open a connection for `key` ahead of its first tunnel (pre-warm), unless one that takes a tunnel
        is there or being pre-warmed; True if this call dialled.  The connection is pooled as any other (and
        closes after `idle_timeout` without a tunnel).  Raises `PoolConnectError` as `open_tunnel` does.

        A tunnel never waits for a pre-warm: it takes the dial lock, which a pre-warm does not hold, and
        dials its own connection if none is ready.  A pre-warm runs as the pod is enrolled, often while its
        peer is being enrolled too, and such a dial can hang on SYN retransmissions for seconds; a first
        request that waited for it would take as long (a pre-warmed connection that lands later is pooled
        beside the tunnel's, and idles out if it is not needed)."""
        if key in self._warming or self._pick(key) is not None:
            return False
        self._warming.add(key)
        try:
            await self._dial(key)
        finally:
            self._warming.discard(key)
        return True

    def close(self) -> None:
        for conns in list(self._connections.values()):
            for conn in list(conns):
                conn.close()

    def _pick(self, key: PoolKey) -> AioClientConnection | None:
        return pick(key, self._connections.get(key, ()), self._credentials, self._certificate, self._clock(),
                    self._max_streams)

    async def _dial(self, key: PoolKey) -> AioClientConnection:
        where = key.describe()
        try:
            ctx = self._tls(key.source)
        except Exception as exc:
            raise PoolConnectError(f"no client certificate for {key.source}: {exc}") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        try:
            sock = await asyncio.wait_for(self._connect(key), self._connect_timeout)
        except TimeoutError:
            raise PoolConnectError(f"connecting to {where} timed out after {self._connect_timeout:g}s: "
                                   "is the destination node agent running?") from None
        except OSError as exc:
            raise PoolConnectError(f"connecting to {where} failed: {exc.strerror or exc}: "
                                   "is the destination node agent running?") from None
        try:
            conn = await dial(loop, sock, ctx, expected={key.destination}, where=where, config=self._config,
                              idle_timeout=self._idle_timeout, timeout=max(deadline - loop.time(), 0.001))
        except HandshakeError as exc:
            raise PoolConnectError(str(exc)) from None
        self._credentials[conn] = _Credentials.made(self._certificate, key.source, _peer_der(conn))
        self._connections.setdefault(key, []).append(conn)
        conn.finished.add_done_callback(lambda _: self._gone(key, conn))
        self.dialled += 1
        return conn

    def _gone(self, key: PoolKey, conn: AioClientConnection) -> None:
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


def _peer_der(conn: AioClientConnection) -> bytes | None:
    """The peer's certificate, from the finished handshake."""
    tls = conn.transport.get_extra_info("ssl_object") if conn.transport is not None else None
    return tls.getpeercert(binary_form=True) if tls is not None else None
