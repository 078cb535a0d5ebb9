"""The node agent's end of the CNI handover: the Unix socket where the plugin hands over each new pod.

    plugin ADD ──(pod, netns fd)──> hand_over ──> discovery knows it? ──> enrollment settles ──> answer
    plugin DEL ──(pod)────────────> take ───────> enrollment settles (capture removed) ──> fd closed ──> gone
    plugin CHECK ─(pod)───────────> what enrollment has of the pod ──> answer

One request and one answer per connection (`nodeagent.cni.protocol`).  An ADD is answered once a reconcile
pass that started after the handover has finished, so `enrolled` means the pod's listeners and capture
are in place; it is answered before the plugin's timeout runs out in any case, with what is known then.
A namespace that enrollment may still be using (a pod handed over again with a new sandbox, a DEL) is
closed only after the next pass.  The same task group lets go of pods discovery has forgotten and scans
for running pods that were never handed over (`CniPodSource.prune`, `scan`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import trio

from nodeagent.cni import protocol
from nodeagent.cni.protocol import Answer, PodInfo, ProtocolError, Request
from nodeagent.errors import NodeAgentError
from nodeagent.pods.cni import IN_MESH, NOT_IN_MESH, SCAN_INTERVAL, CniPodSource, Handover, HandoverError
from nodeagent.pods.source import PodRef

log = logging.getLogger("nodeagent.pods.handover")

REQUEST_TIMEOUT = 5.0  # seconds a connection has to send its request
ANSWER_MARGIN = 0.5  # the answer leaves this long before the plugin's timeout
DISCOVERY_POLL = 0.1  # seconds between looks at discovery for a pod it does not know yet
PRUNE_INTERVAL = 5.0


class Enrollment(Protocol):
    """What the server needs of the enroller."""

    @property
    def enrolled(self) -> Mapping[str, tuple[PodRef, object]]: ...

    @property
    def failures(self) -> Mapping[str, str]: ...

    async def settle(self) -> None: ...


class HandoverServer:
    def __init__(self, path: str, pods: CniPodSource, enrollment: Enrollment, *,
                 prune_interval: float = PRUNE_INTERVAL, scan_interval: float = SCAN_INTERVAL) -> None:
        self.path = path
        self.pods = pods
        self.enrollment = enrollment
        self.prune_interval = prune_interval
        self.scan_interval = scan_interval
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept handovers until cancelled; then close the socket (and remove it, unless a newer agent
        has taken its path over).  The namespaces held stay open until the pod source is closed (a
        stopping agent still drains connections in them; the next agent finds them in its record)."""
        sock, ino = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._maintain)
                log.info('{"event": "cni socket", "path": "%s", "pods": %d}', self.path, len(self.pods.handovers()))
                task_status.started()
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._connection, conn)
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == ino:  # not a newer agent's socket
                    os.unlink(self.path)

    async def _bind(self) -> tuple[trio.socket.SocketType, int]:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise NodeAgentError(f"--cni-socket {path} exists and is not a socket: remove it or choose another path")
            path.unlink()  # an earlier agent's
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await sock.bind(str(path))
            os.chmod(path, 0o600)  # before it accepts: only root (the runtime's plugin) may hand pods over
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock, os.stat(path).st_ino

    # ---- one connection ------------------------------------------------------------------------------

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        """One request, one answer; nothing a connection does stops the server."""
        with conn:
            received = None
            with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(OSError):
                data, ancdata, flags, _ = await conn.recvmsg(protocol.MAX_MESSAGE, protocol.ancillary_space(),
                                                             socket.MSG_CMSG_CLOEXEC)
                received = protocol.unpack(data, ancdata, flags)
            if received is None or not (received.data or received.fds):  # too slow, reset, or closed unsaid
                return
            try:
                if received.truncated:
                    raise ProtocolError("the message or its descriptors were cut off")
                request = Request.decode(received.data)
            except ProtocolError as exc:
                _close(received.fds)
                log.warning("refused a CNI handover: %s", exc)
                answer = Answer(protocol.FAILED, f"the node agent could not read the request: {exc}")
            else:
                try:
                    answer = await self.answer(request, received.fds)
                except Exception as exc:  # e.g. the record cannot be written: say so, keep serving
                    log.exception("CNI %s of pod %s failed", request.op, request.pod.key)
                    answer = Answer(protocol.FAILED, f"the node agent failed: {exc}")
            with contextlib.suppress(OSError):
                await conn.send(answer.encode())

    async def answer(self, request: Request, fds: list[int]) -> Answer:
        """Carry out one request (owning `fds`) and say how it went, before the plugin stops waiting."""
        deadline = trio.current_time() + max(request.timeout - ANSWER_MARGIN, request.timeout / 2)
        if request.op == protocol.ADD:
            return await self._add(request.pod, fds, deadline)
        _close(fds)
        if request.op == protocol.DEL:
            return await self._delete(request.pod, deadline)
        return self._check(request.pod)

    async def _add(self, pod: PodInfo, fds: list[int], deadline: float) -> Answer:
        if not fds:
            return Answer(protocol.FAILED, "an add must carry the pod's network namespace (SCM_RIGHTS): none came")
        _close(fds[1:])
        try:
            _, replaced = self.pods.hand_over(pod, fds[0])
        except HandoverError as exc:
            return Answer(protocol.FAILED, str(exc))
        await trio.to_thread.run_sync(self.pods.save)
        if replaced is not None:
            self._release_later([replaced])
        with trio.move_on_at(deadline):
            while self.pods.lookup(pod)[0] not in (IN_MESH, NOT_IN_MESH):
                await trio.sleep(DISCOVERY_POLL)
            await self.enrollment.settle()
        answer = self.outcome(pod)
        log.info('{"event": "cni add", "pod": "%s", "result": "%s", "msg": "%s"}', pod.key, answer.result, answer.msg)
        return answer

    async def _delete(self, pod: PodInfo, deadline: float) -> Answer:
        gone = self.pods.take(pod)
        if gone is not None:
            await trio.to_thread.run_sync(self.pods.save)
            await self._release([gone], deadline)
        return Answer(protocol.GONE)

    def _check(self, pod: PodInfo) -> Answer:
        held = self.pods.get(pod)
        if held is None or (pod.container_id and held.pod.container_id and pod.container_id != held.pod.container_id):
            return Answer(protocol.UNKNOWN, f"the node agent does not hold pod {pod.key}")
        return self.outcome(pod)

    def outcome(self, pod: PodInfo) -> Answer:
        status, ref = self.pods.lookup(pod)
        if status == NOT_IN_MESH:
            return Answer(protocol.NOT_IN_MESH)
        if ref is None:
            return Answer(protocol.UNKNOWN, f"discovery does not know pod {pod.key} on node {self.pods.node} "
                                            "(yet): is the control plane reachable?")
        enrolled = self.enrollment.enrolled.get(ref.uid)
        if enrolled is not None and enrolled[0] == ref:
            return Answer(protocol.ENROLLED)
        return Answer(protocol.FAILED, self.enrollment.failures.get(ref.uid, "not enrolled yet"))

    # ---- letting go ----------------------------------------------------------------------------------

    async def _release(self, gone: list[Handover], deadline: float) -> None:
        """Close the handovers' namespaces once enrollment has let go of them (the pass after `take`);
        past `deadline`, the rest of the wait goes on in the background."""
        with trio.move_on_at(deadline) as scope:
            await self.enrollment.settle()
        if scope.cancelled_caught:
            self._release_later(gone)
            return
        for h in gone:
            self.pods.retire(h)

    async def _maintain(self) -> None:
        next_scan = trio.current_time() + self.scan_interval
        while True:
            await trio.sleep(self.prune_interval)
            gone = []
            try:
                gone = self.pods.prune()
                changed = bool(gone)
                if trio.current_time() >= next_scan and self.pods.missing(in_mesh_only=True):
                    next_scan = trio.current_time() + self.scan_interval
                    changed = await trio.to_thread.run_sync(self.pods.scan) > 0 or changed
                if changed:  # the record first: once a namespace is let go, the record no longer has it
                    await trio.to_thread.run_sync(self.pods.save)
            except Exception:  # the next round tries again; the handover socket keeps serving
                log.exception("looking after the handed-over pods failed")
            finally:
                if gone:
                    self._release_later(gone)

    def _release_later(self, gone: list[Handover]) -> None:
        assert self._nursery is not None, "serve() runs the server"
        self._nursery.start_soon(self._release, gone, math.inf)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
