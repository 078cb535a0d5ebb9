"""The discovery server: delta xDS (`AggregatedDiscoveryService/DeltaAggregatedResources`) on grpc.aio.

This module only moves values: requests from the network into each stream's `StreamState`
(`controlplane.discovery.state`, where the protocol lives), pushes from it onto the network, and records
(ACK, NACK) into metrics, logs and the connection table `proxy-status` reads.

Changes from the source (`controlplane.discovery.source`) wake one push task.  It takes a fresh copy of
the resources, works out which names changed, and hands the new snapshot to every stream; changes that
arrive while a push is being prepared are coalesced into the next one (plus an optional `debounce`).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from controlplane.discovery.filter import wants
from controlplane.discovery.source import ResourceSource, changed_names
from controlplane.discovery.state import (
    Acked,
    Nacked,
    Output,
    ProtocolError,
    Push,
    Resources,
    Snapshot,
    StreamState,
    WantsFn,
)
from controlplane.metrics import ControlPlaneMetrics, log_event, short_type

log = logging.getLogger(__name__)

_CLOSE = object()


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
    connected_at: float = field(default_factory=time.time)
    outbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
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
        wants_fn: WantsFn = wants,
        debounce: float = 0.0,
    ) -> None:
        self._source = source
        self.metrics = metrics or ControlPlaneMetrics()
        self._wants = wants_fn
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
            stream.outbox.put_nowait(_CLOSE)

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
        stream = _Stream(id=next(self._ids), peer=context.peer(), state=StreamState(self._wants))
        self._streams[stream.id] = stream
        self.metrics.connected.inc()
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while True:
                item = await stream.outbox.get()
                if item is _CLOSE:
                    break
                if isinstance(item, ProtocolError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                assert isinstance(item, Push)
                await context.write(item.to_response())
                self.metrics.pushed(item.type_url, stream.triggers.pop(item.nonce, None))
        finally:
            reader.cancel()
            del self._streams[stream.id]
            self.metrics.connected.dec()
            node = stream.state.node
            log_event("disconnect", stream=stream.id, node_id=node.id, peer=stream.peer)

    async def _read(self, stream: _Stream, requests: AsyncIterator[xds.DeltaDiscoveryRequest]) -> None:
        try:
            async for req in requests:
                first = stream.state.node.id == ""
                try:
                    outputs = stream.state.receive(req, self._snapshot)
                except ProtocolError as exc:
                    stream.outbox.put_nowait(exc)
                    return
                if first:
                    node = stream.state.node
                    log_event(
                        "connect", stream=stream.id, node_id=node.id, role=node.role, node=node.node, peer=stream.peer
                    )
                self._dispatch(stream, outputs, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-read
            log.debug("stream %d: read ended: %s", stream.id, exc)
        stream.outbox.put_nowait(_CLOSE)

    def _dispatch(self, stream: _Stream, outputs: list[Output], trigger: float | None) -> int:
        pushes = 0
        for out in outputs:
            if isinstance(out, Push):
                stream.triggers[out.nonce] = trigger
                if len(stream.triggers) > 512:
                    stream.triggers.pop(next(iter(stream.triggers)))
                stream.outbox.put_nowait(out)
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
        """The connection table, JSON-ready: what `meshctl proxy-status` shows."""
        clients = []
        for s in sorted(self._streams.values(), key=lambda s: s.id):
            node = s.state.node
            clients.append(
                {
                    "stream": s.id,
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
        return {"version": self._snapshot.version, "clients": clients}


def add_to_server(server: grpc.aio.Server, discovery: DiscoveryServer) -> None:
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(discovery, server)  # type: ignore[no-untyped-call]
