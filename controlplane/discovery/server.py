"""The discovery server: delta xDS (`AggregatedDiscoveryService/DeltaAggregatedResources`) on grpc.aio.

This module only moves values: requests from the network into each stream's `StreamState`
(`controlplane.discovery.state`, where the protocol lives), pushes from it onto the network, and records
(ACK, NACK) into metrics, logs and the connection table `proxy-status` reads.

Every stream is authenticated with the CA's `authenticator` (`ca.auth`: the control plane's JWTs in the
local cluster; on Kubernetes `ca.tokenreview.TokenReviewAuthenticator`) from its `authorization: Bearer`
token, before anything is read; a refusal ends the stream with the authenticator's status
(UNAUTHENTICATED, or UNAVAILABLE when the check itself failed).  A server without an authenticator
refuses every stream.  The token then decides who the client is (`controlplane.discovery.identity`): the
`node` it sends may not contradict it, and the connection table shows only authenticated identities.
A stream lives no longer than the token that opened it: when the token expires (if the authenticator
says when) the stream is ended, cleanly, and the client opens the next one with the fresh token its
holder has meanwhile been given.  So a revoked or rotated-out token keeps no stream open either.

Bounds (`Limits`): concurrent streams in all (checked before the token is) and per identity, and per
stream the subscriptions (`StreamState`) and the responses queued for a client that does not read them
(`_Outbox`); going over one ends that stream with RESOURCE_EXHAUSTED.

Changes from the source (`controlplane.discovery.source`) wake one push task.  It takes a fresh copy of
the resources, works out which names changed, and hands the new snapshot to every stream; changes that
arrive while a push is being prepared are coalesced into the next one (plus an optional `debounce`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds

from ca.auth import Authenticator
from ca.errors import CAError
from ca.service import metadata_dict
from controlplane.discovery.filter import ViewFn, view
from controlplane.discovery.identity import Principal, WaypointDirectory, identify
from controlplane.discovery.source import ResourceSource, changed_names
from controlplane.discovery.state import (
    DEFAULT_LIMITS,
    Acked,
    Limits,
    Nacked,
    Output,
    ProtocolError,
    Push,
    Resources,
    Snapshot,
    StreamState,
    exhausted,
)
from controlplane.metrics import ControlPlaneMetrics, log_event, short_type

log = logging.getLogger(__name__)

_CLOSE = object()


class _Outbox:
    """What is waiting to be written to one client, at most `limit` items; `close()` jumps the queue."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing: Any = None

    def put(self, item: Any) -> bool:
        """Queue `item`; False when the outbox is full (the client is not reading)."""
        if len(self._items) >= self._limit:
            return False
        self._items.append(item)
        self._ready.set()
        return True

    def close(self, item: Any = _CLOSE) -> None:
        """End the stream with `item` (`_CLOSE`, or a `ProtocolError` to abort with), whatever is queued."""
        if self._closing is None:
            self._closing = item
            self._closed.set()
        self._ready.set()

    @property
    def closing(self) -> Any:
        return self._closing

    async def closed(self) -> None:
        await self._closed.wait()

    async def get(self) -> Any:
        """The next item to write, or the closing item once closed."""
        while self._closing is None and not self._items:
            self._ready.clear()
            await self._ready.wait()
        if self._closing is not None:
            return self._closing
        return self._items.popleft()


def snapshot_version(resources: Resources) -> str:
    """A version naming the content: the same resources give the same version, even after a restart."""
    h = hashlib.sha256()
    for type_url in sorted(resources):
        for name, (version, _) in sorted(resources[type_url].items()):
            h.update(f"{type_url}\0{name}\0{version}\n".encode())
    return h.hexdigest()[:12]


@dataclass
class _Stream:
    id: int
    peer: str
    state: StreamState
    principal: Principal
    outbox: _Outbox
    connected_at: float = field(default_factory=time.time)
    # nonce -> monotonic time of the change that caused it (for convergence time)
    triggers: dict[str, float | None] = field(default_factory=dict)


class DiscoveryServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Serves one `ResourceSource` to any number of delta xDS streams.  Call `start()` inside the
    event loop before serving, `stop()` when done."""

    def __init__(
        self,
        source: ResourceSource,
        metrics: ControlPlaneMetrics | None = None,
        *,
        view_fn: ViewFn = view,
        debounce: float = 0.0,
        authenticator: Authenticator | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._source = source
        self.authenticator = authenticator  # the CA's; set by the assembly before serving
        self.limits = limits
        self._opening = 0  # streams being authenticated
        self._waypoints = WaypointDirectory(lambda: (self._snapshot.version, self._snapshot.resources))
        self.metrics = metrics or ControlPlaneMetrics()
        self._view = view_fn
        self._debounce = debounce
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._snapshot = Snapshot(version="", resources={})
        self._wake = asyncio.Event()
        self._trigger: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancel_watch: Any = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

        def notify() -> None:
            loop.call_soon_threadsafe(self._changed)

        self._cancel_watch = self._source.watch(notify)
        resources = await asyncio.to_thread(self._source.resources)
        self._snapshot = Snapshot(snapshot_version(resources), resources)
        self._task = asyncio.create_task(self._push_loop(), name="xds-push")

    async def stop(self) -> None:
        if self._cancel_watch is not None:
            self._cancel_watch()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for stream in list(self._streams.values()):
            stream.outbox.close()

    @property
    def version(self) -> str:
        return self._snapshot.version

    def resources(self) -> Resources:
        return self._snapshot.resources

    # -- pushes on change --------------------------------------------------------------------------

    def _changed(self) -> None:
        if self._trigger is None:
            self._trigger = time.monotonic()
        self._wake.set()

    async def _push_loop(self) -> None:
        while True:
            await self._wake.wait()
            if self._debounce:
                await asyncio.sleep(self._debounce)
            self._wake.clear()
            trigger, self._trigger = self._trigger, None
            try:
                resources = await asyncio.to_thread(self._source.resources)
            except Exception:
                log.exception("reading the discovery source failed; keeping the previous snapshot")
                continue
            self.publish(resources, trigger)

    def publish(self, resources: Resources, trigger: float | None = None) -> None:
        """Make `resources` the current snapshot and push what changed to every stream."""
        started = time.monotonic()
        changes = changed_names(self._snapshot.resources, resources)
        if not changes:
            return
        self._snapshot = Snapshot(snapshot_version(resources), resources)
        responses = 0
        for stream in list(self._streams.values()):
            try:
                outputs = stream.state.on_snapshot(self._snapshot, changes)
            except Exception:
                log.exception("stream %d: computing a push failed", stream.id)
                continue
            responses += self._dispatch(stream, outputs, trigger)
        log_event(
            "push",
            version=self._snapshot.version,
            changed={short_type(t): len(n) for t, n in sorted(changes.items())},
            clients=len(self._streams),
            responses=responses,
            prepare_ms=round((time.monotonic() - started) * 1000, 2),
        )

    # -- streams -----------------------------------------------------------------------------------

    async def DeltaAggregatedResources(  # type: ignore[override]  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[xds.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        principal = await self._authenticate(context)
        state = StreamState(self._view, limits=self.limits,
                            identify=functools.partial(identify, principal, directory=self._waypoints))
        stream = _Stream(id=next(self._ids), peer=context.peer(), state=state, principal=principal,
                         outbox=_Outbox(self.limits.outbox))
        self._streams[stream.id] = stream
        self.metrics.connected.inc()
        reader = asyncio.create_task(self._read(stream, request_iterator))
        # The writer may be stuck in a write to a client that does not read: closing must not wait for it.
        writer = asyncio.create_task(self._write(stream, context))
        closed = asyncio.create_task(stream.outbox.closed())
        expiry = asyncio.create_task(self._expire(stream, principal.caller.expires))
        try:
            await asyncio.wait((writer, closed), return_when=asyncio.FIRST_COMPLETED)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            end = stream.outbox.closing
            if isinstance(end, ProtocolError):
                log_event("closed", logging.WARNING, stream=stream.id, caller=str(principal), peer=stream.peer,
                          code=end.code, error=str(end))
                await context.abort(grpc.StatusCode[end.code], f"discovery: {end}")
        finally:
            for task in (reader, writer, closed, expiry):
                task.cancel()
            del self._streams[stream.id]
            self.metrics.connected.dec()
            node = stream.state.node
            log_event("disconnect", stream=stream.id, node_id=node.id, peer=stream.peer)

    @staticmethod
    async def _expire(stream: _Stream, expires: float | None) -> None:
        """End the stream (cleanly: the client reconnects with its renewed token) when its token expires."""
        if expires is None:
            return
        await asyncio.sleep(max(0.0, expires - time.time()))
        log_event("token_expired", stream=stream.id, caller=str(stream.principal), peer=stream.peer)
        stream.outbox.close()

    async def _write(self, stream: _Stream, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while True:
            item = await stream.outbox.get()
            if not isinstance(item, Push):
                return
            await context.write(item.to_response())
            self.metrics.pushed(item.type_url, stream.triggers.pop(item.nonce, None))

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """Who the caller is, within the stream limits; the stream is aborted if it is refused."""
        refusal: tuple[grpc.StatusCode, str, str] | None = None
        if len(self._streams) + self._opening >= self.limits.max_streams:
            refusal = (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_streams",
                       f"the control plane serves at most {self.limits.max_streams} discovery streams; retry later")
        elif self.authenticator is None:
            refusal = (grpc.StatusCode.UNAUTHENTICATED, "no_authenticator",
                       "this control plane has no authenticator: no stream is served")
        principal: Principal | None = None
        if refusal is None:
            assert self.authenticator is not None
            metadata = metadata_dict(context.invocation_metadata())  # type: ignore[arg-type]
            self._opening += 1
            try:
                principal = Principal(await asyncio.to_thread(self.authenticator.authenticate, metadata))
            except CAError as exc:
                refusal = (exc.code, exc.reason, str(exc))
            finally:
                self._opening -= 1
        if principal is not None:
            open_streams = sum(1 for s in self._streams.values() if s.principal.key == principal.key)
            if open_streams >= self.limits.max_streams_per_identity:
                refusal = (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_streams",
                           f"{principal} has {open_streams} discovery streams open, the most one identity may have")
        if refusal is not None or principal is None:
            code, reason, message = refusal or (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", "")
            log_event("refused", logging.WARNING, peer=context.peer(), reason=reason, error=message)
            await context.abort(code, f"discovery: {message}")
            raise AssertionError("not reached: abort raises")
        return principal

    async def _read(self, stream: _Stream, requests: AsyncIterator[xds.DeltaDiscoveryRequest]) -> None:
        try:
            async for req in requests:
                first = stream.state.node.id == ""
                try:
                    outputs = stream.state.receive(req, self._snapshot)
                except ProtocolError as exc:
                    stream.outbox.close(exc)
                    return
                if first:
                    node = stream.state.node
                    log_event("connect", stream=stream.id, node_id=node.id, role=node.role, node=node.node,
                              caller=str(stream.principal), peer=stream.peer)
                self._dispatch(stream, outputs, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-read
            log.debug("stream %d: read ended: %s", stream.id, exc)
        stream.outbox.close()

    def _dispatch(self, stream: _Stream, outputs: list[Output], trigger: float | None) -> int:
        pushes = 0
        for out in outputs:
            if isinstance(out, Push):
                stream.triggers[out.nonce] = trigger
                if len(stream.triggers) > 512:
                    stream.triggers.pop(next(iter(stream.triggers)))
                if not stream.outbox.put(out):
                    stream.outbox.close(exhausted(
                        f"{self.limits.outbox} responses are waiting for this client, which is not reading them: "
                        "closing the stream (reconnect to resume)"))
                    break
                pushes += 1
            elif isinstance(out, Acked):
                self.metrics.acked(out.type_url)
            elif isinstance(out, Nacked):
                self.metrics.nacked(out.type_url)
                log_event(
                    "nack",
                    logging.WARNING,
                    stream=stream.id,
                    node_id=stream.state.node.id,
                    type=short_type(out.type_url),
                    version=out.version,
                    resources=list(out.names),
                    error=out.error,
                )
        return pushes

    # -- reporting ---------------------------------------------------------------------------------

    def acked_count(self, type_url: str, version: str) -> int:
        """How many streams have ACKed `version` of `type_url` (cheap; for benchmarks and tests)."""
        n = 0
        for s in self._streams.values():
            ts = s.state.types.get(type_url)
            if ts is not None and ts.acked_version == version:
                n += 1
        return n

    def connections(self) -> dict[str, Any]:
        """The connection table, JSON-ready: what `meshctl proxy-status` shows.  Every entry is an
        authenticated stream; `identity` is its token's, and role, node and name were checked against it."""
        clients = []
        for s in sorted(self._streams.values(), key=lambda s: s.id):
            node = s.state.node
            clients.append(
                {
                    "stream": s.id,
                    "identity": str(s.principal),
                    "node_id": node.id,
                    "role": node.role,
                    "node": node.node,
                    "namespace": node.namespace,
                    "name": node.name,
                    "peer": s.peer,
                    "connected_at": round(s.connected_at, 3),
                    "acked_version": s.state.last_acked_version,
                    "types": s.state.status(),
                }
            )
        return {"version": self._snapshot.version, "clients": clients, "errors": list(self._source.errors())}


def add_to_server(server: grpc.aio.Server, discovery: DiscoveryServer) -> None:
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(discovery, server)  # type: ignore[no-untyped-call]
