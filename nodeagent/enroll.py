"""Enrollment: keep the pods of this node that are in the mesh captured, and only those.

`desired(state, node, netns_format)` says which pods should be enrolled (a pure function of the mesh
state: HBONE workloads on this node that are not waypoints).  `Enroller` compares that with what it has
and acts: a pod that joins gets its listeners (through `start_pod`) and then its redirect rules; a pod
that leaves loses its rules first (so no new connection is captured) and then its listeners.  At start
it also looks at every pod of the node: rules left by an earlier run are adopted for pods still in the
mesh and removed for the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.errors import NodeAgentError
from nodeagent.proxy.routing import workload_identity
from nodeagent.redirect import iptables
from nodeagent.state import MeshState

log = logging.getLogger("nodeagent.enroll")
RESYNC_INTERVAL = 2.0


@dataclass(frozen=True)
class PodRef:
    uid: str
    namespace: str
    name: str
    ip: str
    identity: SpiffeId
    netns: str  # path of the pod's network namespace

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodHandle(Protocol):
    async def stop(self) -> None: ...


def pod_netns(netns_format: str, w: pb.Workload) -> str:
    return netns_format.format(namespace=w.namespace, name=w.name, uid=w.uid)


def desired(state: MeshState, node: str, netns_format: str) -> dict[str, PodRef]:
    out = {}
    for w in state.workloads_on(node):
        if w.tunnel_protocol == pb.HBONE and not w.is_waypoint and w.addresses:
            out[w.uid] = PodRef(w.uid, w.namespace, w.name, w.addresses[0], workload_identity(w),
                                pod_netns(netns_format, w))
    return out


class Enroller:
    def __init__(self, node: str, state: MeshState, netns_format: str,
                 start_pod: Callable[[PodRef], Awaitable[PodHandle]]) -> None:
        self.node = node
        self.state = state
        self.netns_format = netns_format
        self.start_pod = start_pod
        self.enrolled: dict[str, tuple[PodRef, PodHandle]] = {}
        self.failures: dict[str, str] = {}
        self._changed = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None

    def notify(self, kind: str = "") -> None:
        """Called by the state on each update, from whichever thread applied it."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):  # the agent is shutting down
            token.run_sync_soon(self._changed.set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.state.on_change(self.notify)
        await self.clean_leftovers()
        await self.reconcile()
        task_status.started()
        # No release on the way out: a pod keeps its rules while the agent restarts (its connections
        # fail closed rather than leave the mesh), and the next run adopts them.
        while True:
            with trio.move_on_after(RESYNC_INTERVAL):
                await self._changed.wait()
            self._changed = trio.Event()
            await self.reconcile()

    async def clean_leftovers(self) -> None:
        """Remove rules an earlier run left in pods of this node that are no longer in the mesh."""
        want = desired(self.state, self.node, self.netns_format)
        for w in self.state.workloads_on(self.node):
            if w.uid in want or w.is_waypoint:
                continue
            path = pod_netns(self.netns_format, w)
            if os.path.exists(path):
                try:
                    if await trio.to_thread.run_sync(iptables.remove, path):
                        log.info('{"event": "released leftover", "pod": "%s/%s"}', w.namespace, w.name)
                except NodeAgentError as exc:
                    log.warning("could not clean pod %s/%s: %s", w.namespace, w.name, exc)

    async def reconcile(self) -> None:
        want = desired(self.state, self.node, self.netns_format)
        for uid in [u for u in self.enrolled if u not in want or want[u] != self.enrolled[u][0]]:
            await self.release(uid)
        for uid, ref in want.items():
            if uid not in self.enrolled:
                await self.enroll(ref)

    async def enroll(self, ref: PodRef) -> None:
        if not os.path.exists(ref.netns):
            self.failures[ref.uid] = f"network namespace {ref.netns} does not exist (yet)"
            return
        try:
            handle = await self.start_pod(ref)  # listeners first, so captured traffic finds them
        except (OSError, NodeAgentError) as exc:
            self._failed(ref, f"could not open listeners: {exc}")
            return
        try:
            outcome = await trio.to_thread.run_sync(iptables.install, ref.netns)
        except NodeAgentError as exc:
            await handle.stop()
            self._failed(ref, str(exc))
            return
        self.enrolled[ref.uid] = (ref, handle)
        self.failures.pop(ref.uid, None)
        log.info('{"event": "enrolled", "pod": "%s", "ip": "%s", "rules": "%s"}', ref.key, ref.ip, outcome.value)

    async def release(self, uid: str) -> None:
        ref, handle = self.enrolled.pop(uid)
        try:
            if os.path.exists(ref.netns):
                await trio.to_thread.run_sync(iptables.remove, ref.netns)
        except NodeAgentError as exc:
            log.warning("could not remove the rules of pod %s: %s", ref.key, exc)
        await handle.stop()
        log.info('{"event": "released", "pod": "%s"}', ref.key)

    def _failed(self, ref: PodRef, why: str) -> None:
        if self.failures.get(ref.uid) != why:
            log.warning("cannot enroll pod %s: %s (will retry)", ref.key, why)
        self.failures[ref.uid] = why
