"""Enrollment: keep the pods of this node that are in the mesh captured, and only those.

`Enroller` talks to two seams only: a `PodSource` says which pods should be captured, and a `Redirector`
captures them.  A pod that joins gets its listeners (through `start_pod`) and then its capture; a pod
that leaves loses its capture first (so no new connection is captured) and then its listeners.  At start
it looks at every pod of the node: capture left by an earlier run is adopted for pods still in the mesh
(by `install`) and removed for the others.  No release on the way out: a pod keeps its capture while
the agent restarts, so its connections fail closed rather than leave the mesh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import trio

from mesh.errors import MeshError
from nodeagent.pods.source import PodRef, PodSource
from nodeagent.redirect.base import Redirector

log = logging.getLogger("nodeagent.enroll")
RESYNC_INTERVAL = 2.0


class PodHandle(Protocol):
    @property
    def listeners(self) -> Mapping[int, socket.socket]: ...

    async def stop(self) -> None: ...


StartPod = Callable[[PodRef], Awaitable[PodHandle]]


class Enroller:
    def __init__(self, pods: PodSource, redirector: Redirector, start_pod: StartPod, *,
                 resync_interval: float = RESYNC_INTERVAL) -> None:
        self.pods = pods
        self.redirector = redirector
        self.start_pod = start_pod
        self.resync_interval = resync_interval
        self.enrolled: dict[str, tuple[PodRef, PodHandle]] = {}
        self.failures: dict[str, str] = {}
        self._changed = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._passes = (0, 0)  # reconcile passes started, finished
        self._pass_done = trio.Event()

    def notify(self) -> None:
        """Called by the pod source on each change, from whichever thread saw it."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):  # the agent is shutting down
            token.run_sync_soon(self._changed.set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.pods.subscribe(self.notify)
        await self.clean_leftovers()
        await self.reconcile()
        task_status.started()
        while True:
            with trio.move_on_after(self.resync_interval):
                await self._changed.wait()
            self._changed = trio.Event()
            await self.reconcile()

    async def clean_leftovers(self) -> None:
        """Remove capture an earlier run left in pods of this node that are no longer in the mesh."""
        want = self.pods.desired()
        for ref in self.pods.on_node():
            if ref.uid in want or not os.path.exists(ref.netns):
                continue
            try:
                if await trio.to_thread.run_sync(self.redirector.remove, ref):
                    log.info('{"event": "released leftover", "pod": "%s"}', ref.key)
            except MeshError as exc:
                log.warning("could not clean pod %s: %s", ref.key, exc)

    async def reconcile(self) -> None:
        started = self._passes[0] + 1
        self._passes = (started, self._passes[1])
        try:
            want = self.pods.desired()
            for uid in [u for u in self.enrolled if u not in want or want[u] != self.enrolled[u][0]]:
                await self.release(uid)
            for uid, ref in want.items():
                if uid not in self.enrolled:
                    await self.enroll(ref)
        finally:
            self._passes = (self._passes[0], max(self._passes[1], started))
            self._pass_done.set()
            self._pass_done = trio.Event()

    async def settle(self) -> None:
        """Return once a reconcile pass that started after this call has finished (the running loop is
        woken for it): what the pod source said before the call is then carried out, or in `failures`."""
        target = self._passes[0] + 1
        self._changed.set()
        while self._passes[1] < target:
            await self._pass_done.wait()

    async def enroll(self, ref: PodRef) -> None:
        if not os.path.exists(ref.netns):
            self.failures[ref.uid] = f"network namespace {ref.netns} does not exist (yet)"
            return
        try:
            handle = await self.start_pod(ref)  # listeners first, so captured traffic finds them
        except (OSError, MeshError) as exc:
            self._failed(ref, f"could not open listeners: {exc}")
            return
        try:
            outcome = await trio.to_thread.run_sync(self.redirector.install, ref, handle.listeners)
        except (OSError, MeshError) as exc:
            await handle.stop()
            self._failed(ref, str(exc))
            return
        self.enrolled[ref.uid] = (ref, handle)
        self.failures.pop(ref.uid, None)
        log.info('{"event": "enrolled", "pod": "%s", "ip": "%s", "mode": "%s", "rules": "%s"}',
                 ref.key, ref.ip, self.redirector.mode, outcome.value)

    async def release(self, uid: str) -> None:
        ref, handle = self.enrolled.pop(uid)
        try:
            if os.path.exists(ref.netns):
                await trio.to_thread.run_sync(self.redirector.remove, ref)
        except (OSError, MeshError) as exc:
            log.warning("could not remove the capture of pod %s: %s", ref.key, exc)
        await handle.stop()
        log.info('{"event": "released", "pod": "%s"}', ref.key)

    def _failed(self, ref: PodRef, why: str) -> None:
        if self.failures.get(ref.uid) != why:
            log.warning("cannot enroll pod %s: %s (will retry)", ref.key, why)
        self.failures[ref.uid] = why
