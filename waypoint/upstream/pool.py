"""Connections toward endpoints: the injected `Upstream` connector and a keep-alive pool over it.

The waypoint never opens sockets itself.  An `Upstream` turns an endpoint into a byte stream: in the mesh
that is an HBONE tunnel to the endpoint's node agent; `TcpUpstream` (plain TCP) serves tests and
benchmarks.  `ConnectionPool` keeps idle HTTP connections per (endpoint, protocol, client, service) and
reuses them, as Envoy keeps a pool per cluster and host.  The client is the original client's address
without its port (`ClientInfo.forwarded_for`): a connection to an endpoint names it in the HBONE
`Forwarded` header, so a connection opened for one client address is never handed to another, while all the connections of one client (a pod opening a connection
per request) share the pool, as any HTTP proxy's upstream pool does.  (The destination's agent sees the
waypoint as the peer and decides on that; `Forwarded` is what it and its log are told of the client.)
`run()` closes what stayed idle past `idle_timeout`, for clients that never come back.  `retire(changed)` (a
new route table) takes the connections of every key that `changed` names out of use: where a tunnel goes
(a gateway's waypoint hop, the identity the endpoint must present) and the cluster's settings were decided
under the old configuration, so no request of the new one goes on such a connection; the keys whose
endpoint and service did not change keep their connections (`waypoint.config.pool_changes` decides).

HTTP/1.1 connections carry one request at a time and wait idle in the pool between requests.  HTTP/2
connections are shared: `acquire` hands out a stream on a connection of the key that has room (the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, see `waypoint.http.http2_client`), and opens another connection only when
all are full; `release` gives the stream back.  A connection that is closed, or draining after GOAWAY with
no streams left, or idle past `idle_timeout`, is closed on the next `acquire` of its key, or by `run()`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Protocol

import trio

from waypoint.errors import ConnectFailure, UpstreamError
from waypoint.http.exchange import UpstreamConnection
from waypoint.http.http1 import Http1Client
from waypoint.http.http2_client import Http2Connection, Http2Stream
from waypoint.l7.model import Endpoint

PoolKey = tuple[str, str, str]  # (endpoint "ip:port", client address, service hostname or "")
Changed = Callable[[str, str], bool]  # (endpoint "ip:port", service) -> its connections must be retired


class _Dial:
    """A connection being opened for a key: `stale` once a `retire` named the key meanwhile (what the
    connection rests on was decided under the table before)."""

    __slots__ = ("key", "stale")

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.stale = False


class Upstream(Protocol):
    """Opens a byte stream to an endpoint.  `service` is the service hostname the request was for ("" for
    workload-addressed traffic) and `client` the original client's `ip:port` ("" when unknown), both for
    the tunnel's `Forwarded` header; `traceparent` the trace context of the request that opens it (the
    tunnel's CONNECT carries it, so the destination's agent links its span).  Raise `ConnectFailure` (or
    OSError) when the endpoint cannot be reached."""

    async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                      traceparent: str = "") -> trio.abc.HalfCloseableStream: ...


class TcpUpstream:
    """Plain TCP to `endpoint.address:endpoint.port` (tests, benchmarks, non-mesh endpoints)."""

    async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                      traceparent: str = "") -> trio.abc.HalfCloseableStream:
        try:
            return await trio.open_tcp_stream(endpoint.address, endpoint.port)
        except OSError as exc:
            raise ConnectFailure(f"cannot connect to {endpoint.key}: {exc.strerror or exc}") from exc


# Idle HTTP/1.1 connections kept per key: all of one client address's connections share a key, so after a
# burst as many come back as the client had requests in flight at once (64 in the bench's saturation phase;
# a bound of 32 closed half of them on each release and opened them again).  `idle_timeout` closes the rest.
MAX_IDLE_PER_KEY = 1024


class ConnectionPool:
    def __init__(self, upstream: Upstream, idle_timeout: float = 60.0, max_idle: int = MAX_IDLE_PER_KEY,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._clock = clock
        self._idle: dict[tuple[str, PoolKey], list[tuple[float, UpstreamConnection]]] = {}  # (protocol, key)
        self._shared: dict[PoolKey, list[Http2Connection]] = defaultdict(list)
        self._opening: dict[PoolKey, trio.Lock] = defaultdict(trio.Lock)
        self._retired: list[Http2Connection] = []  # no new streams; closed once their streams have ended
        self._unused: list[UpstreamConnection] = []  # retired while idle: `run` closes them
        self._wake = trio.Event()  # `run` has retired connections to close
        self._dials: set[_Dial] = set()  # connections being opened
        # Every HTTP/1.1 connection opened and not closed yet, with its key; those in use when their key was
        # retired are closed when given back (`_doomed`).
        self._keys: weakref.WeakKeyDictionary[UpstreamConnection, PoolKey] = weakref.WeakKeyDictionary()
        self._doomed: weakref.WeakSet[UpstreamConnection] = weakref.WeakSet()
        self.opened = 0

    def retire(self, changed: Changed | None = None) -> None:
        """Take the connections of the keys `changed` names (every key without it) out of use: idle ones are
        closed (by `run`, at once), those in use when they are given back, and shared HTTP/2 ones take no new
        stream and close once their streams end."""
        def gone(key: PoolKey) -> bool:
            return changed is None or changed(key[0], key[2])

        for ikey, conns in list(self._idle.items()):
            if gone(ikey[1]):
                self._unused += [conn for _, conn in conns]
                del self._idle[ikey]
        for conn, key in list(self._keys.items()):
            if gone(key):
                self._doomed.add(conn)  # (in use: closed when given back; idle ones are in `_unused` now)
        for skey, shared in list(self._shared.items()):
            if gone(skey):
                self._retired += shared
                del self._shared[skey]
        for dial in self._dials:
            dial.stale = dial.stale or gone(dial.key)
        self._wake.set()

    async def _close_retired(self) -> None:
        unused, self._unused = self._unused, []
        done = [conn for conn in self._retired if conn.closed or conn.reserved == 0]
        self._retired = [conn for conn in self._retired if conn not in done]
        for conn in unused:
            await conn.aclose()
        for h2conn in done:
            await h2conn.aclose()

    async def run(self) -> None:
        """Until cancelled: every quarter of `idle_timeout`, close what has been idle longer (`expire`), and
        what `retire` took out of use as soon as it does."""
        while True:
            with trio.move_on_after(self.idle_timeout / 4):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.expire()

    async def expire(self) -> None:
        """Close the idle connections of every key that are past `idle_timeout` (HTTP/2 ones also when
        closed or drained), and forget the keys left empty: a client that never comes back leaves nothing
        behind."""
        now = self._clock()
        expired: list[UpstreamConnection] = []
        for key, idle in list(self._idle.items()):  # (no checkpoint in this loop: `acquire` sees each list whole)
            expired += [conn for since, conn in idle if now - since >= self.idle_timeout]
            idle[:] = [(since, conn) for since, conn in idle if now - since < self.idle_timeout]
            if not idle:
                del self._idle[key]
        for conn in expired:
            await conn.aclose()
        await self._close_retired()
        for skey, conns in list(self._shared.items()):
            lock = self._opening[skey]
            if lock.locked():
                continue  # a connection of this key is being opened: that `acquire` sweeps the key
            async with lock:
                await self._sweep(conns)
            if not conns and self._shared.get(skey) is conns and not lock.locked() \
                    and lock.statistics().tasks_waiting == 0:
                self._shared.pop(skey, None)
                self._opening.pop(skey, None)

    async def acquire(self, endpoint: Endpoint, protocol: str, connect_timeout: float,
                      service: str = "", client: str = "", traceparent: str = "") -> tuple[UpstreamConnection, bool]:
        """A connection (HTTP/2: a stream) and whether it was reused from the pool (`traceparent`: of the
        request that would open a new one)."""
        if protocol == "HTTP/2":
            return await self._acquire_stream(endpoint, connect_timeout, service, client, traceparent)
        key = (endpoint.key, client, service)
        idle = self._idle.get((protocol, key))
        if idle:
            now = self._clock()
            while idle:
                since, conn = idle.pop()
                if now - since < self.idle_timeout:
                    return conn, True
                await conn.aclose()
        with self._dialling(key) as dial:
            stream = await self._connect(endpoint, connect_timeout, service, client, traceparent)
        conn = Http1Client(stream)
        self._keys[conn] = key
        if dial.stale:
            self._doomed.add(conn)  # it carries the request it was opened for, and is closed then
        return conn, False

    @contextlib.contextmanager
    def _dialling(self, key: PoolKey) -> Iterator[_Dial]:
        dial = _Dial(key)
        self._dials.add(dial)
        try:
            yield dial
        finally:
            self._dials.discard(dial)

    async def _connect(self, endpoint: Endpoint, connect_timeout: float, service: str, client: str,
                       traceparent: str) -> trio.abc.HalfCloseableStream:
        with trio.move_on_after(connect_timeout) as cs:
            stream = await self.upstream.connect(endpoint, service=service, client=client, traceparent=traceparent)
        if cs.cancelled_caught:
            raise ConnectFailure(f"connection to {endpoint.key} timed out after {connect_timeout:g}s")
        self.opened += 1
        return stream

    async def _acquire_stream(self, endpoint: Endpoint, connect_timeout: float, service: str, client: str,
                              traceparent: str) -> tuple[Http2Stream, bool]:
        key = (endpoint.key, client, service)
        async with self._opening[key]:  # one connection opened at a time per key: the others then share it
            await self._sweep(self._shared[key])
            for conn in self._shared[key]:  # (read again: a `retire` during the sweep left none to share)
                if conn.has_capacity:
                    return conn.open_stream(), True
            with self._dialling(key) as dial:
                conn = await self._open_shared(endpoint, connect_timeout, service, client, traceparent)
            # shared from now on, unless its key was retired while it opened: then it carries this stream only
            (self._retired if dial.stale else self._shared[key]).append(conn)
            return conn.open_stream(), False

    async def _open_shared(self, endpoint: Endpoint, connect_timeout: float, service: str, client: str,
                           traceparent: str) -> Http2Connection:
        stream = await self._connect(endpoint, connect_timeout, service, client, traceparent)
        conn = Http2Connection(stream, clock=self._clock)
        try:
            with trio.move_on_after(connect_timeout) as cs:
                await conn.start()
        except UpstreamError:
            await conn.aclose()
            raise
        if cs.cancelled_caught:
            await conn.aclose()
            raise ConnectFailure(f"{endpoint.key} sent no HTTP/2 SETTINGS within {connect_timeout:g}s: "
                                 "does the endpoint speak HTTP/2 (prior knowledge) on this port?")
        return conn

    async def _sweep(self, conns: list[Http2Connection]) -> None:
        """Close the connections of one key that are gone, drained, or idle for too long."""
        now = self._clock()
        for conn in list(conns):
            idle = conn.reserved == 0
            if conn.closed or (idle and (not conn.has_capacity or now - conn.idle_since >= self.idle_timeout)):
                conns.remove(conn)
                await conn.aclose()

    async def release(self, endpoint: Endpoint, protocol: str, conn: UpstreamConnection, reuse: bool = True,
                      client: str = "", service: str = "") -> None:
        if isinstance(conn, Http2Stream):
            await conn.aclose()  # the stream's slot; the connection stays shared
            return
        key = (endpoint.key, client, service)
        if reuse and conn.reusable and conn not in self._doomed:
            idle = self._idle.setdefault((protocol, key), [])
            if len(idle) < self.max_idle:
                self._keys.setdefault(conn, key)  # (one not opened here, given to the pool)
                idle.append((self._clock(), conn))
                return
        self._keys.pop(conn, None)
        await conn.aclose()

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def shared_count(self) -> int:
        """HTTP/2 connections open (each may carry many requests)."""
        return sum(1 for v in self._shared.values() for c in v if not c.closed)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for _, conn in idle:
                await conn.aclose()
        self._idle.clear()
        for shared in self._shared.values():
            for h2conn in shared:
                await h2conn.aclose()
        self._shared.clear()
        unused, retired, self._unused, self._retired = self._unused, self._retired, [], []
        for conn in unused:
            await conn.aclose()
        for h2conn in retired:
            await h2conn.aclose()
