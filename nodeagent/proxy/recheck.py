"""Inbound connections decided again when authorization changes: those a policy now denies are closed.

An inbound connection is decided once, when it arrives (`admission.decide`); a tunnel may then live long
(a waypoint pools its upstream tunnels across its clients).  As ztunnel does after a policy update, the
agent remembers every inbound connection it admitted and relays (`AdmittedConnections`, the agent's, per
pod, with the `InboundConnection` it was decided on and its two ends: the client's, a tunnel or a
plaintext connection, and the application's), and forgets it when it ends.  When the agent's state
applies an authorization update, `Rechecker` schedules one pass on the engine (a burst of updates makes
one pass at a time, which reads the newest state); the pass (`recheck`) decides each remembered
connection again, with the same `admission.decide`, and closes those a policy now denies: both ends
aborted (a tunnel is reset), logged with the pod, the client and the policy's reason (another refusal,
such as the pod missing from the state for a moment, leaves it open).  The inbound path then records
the connection's outcome with the refusal (flag RBAC, failure `denied`).  Those still allowed are left
alone.  A connection decided before a pass that ran while it was connecting to the application (not held
yet) is decided again as it is held (`decide_again`).  Everything but `Rechecker.on_change` runs on the
engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from mesh.hbone.engine import Engine
from mesh.hbone.splice import End
from nodeagent.metrics import FailureReason
from nodeagent.pods.source import PodRef
from nodeagent.proxy import admission
from nodeagent.proxy.admission import InboundConnection, Refusal
from nodeagent.state import AUTHORIZATION, MeshState

log = logging.getLogger("nodeagent.inbound")


@dataclass(eq=False)
class Admitted:
    """One admitted inbound connection being relayed."""

    pod: PodRef
    conn: InboundConnection
    client: End  # the client's side: the CONNECT's tunnel, or the plaintext connection
    app: End  # the application's connection
    closed_by: Refusal | None = None  # set when a later decision refused it and it was closed

    def close(self, refusal: Refusal) -> None:
        """Both ends, abortively (a tunnel is reset): the relay ends, and the outcome says why."""
        self.closed_by = replace(refusal, reason=f"closed after a policy update: {refusal.reason}")
        self.client.abort()
        self.app.abort()


class AdmittedConnections:
    """The inbound connections being relayed, per pod (on the engine only)."""

    def __init__(self) -> None:
        self._by_pod: dict[str, set[Admitted]] = {}
        self.generation = 0  # passes of `recheck` so far: one decided before a pass is decided again when held

    @contextmanager
    def holding(self, pod: PodRef, conn: InboundConnection, client: End, app: End) -> Iterator[Admitted]:
        """Remember the connection while the block runs (its relay)."""
        entry = Admitted(pod, conn, client, app)
        held = self._by_pod.setdefault(pod.uid, set())
        held.add(entry)
        try:
            yield entry
        finally:
            held.discard(entry)
            if not held and self._by_pod.get(pod.uid) is held:
                del self._by_pod[pod.uid]

    def of(self, uid: str) -> list[Admitted]:
        return list(self._by_pod.get(uid, ()))

    def pods(self) -> list[str]:
        return list(self._by_pod)

    def __len__(self) -> int:
        return sum(len(held) for held in self._by_pod.values())


def recheck(view: MeshState, admitted: AdmittedConnections) -> list[Admitted]:
    """(On the engine.)  Decide every remembered connection again; close those now refused.  The closed."""
    admitted.generation += 1
    return [entry for uid in admitted.pods() for entry in admitted.of(uid) if not decide_again(view, entry)]


def decide_again(view: MeshState, entry: Admitted) -> bool:
    """(On the engine.)  Whether `entry` is still admitted; when not, it is closed (and logged).  The inbound
    path also asks this of a connection decided before a pass that ran while it connected to the
    application (it was not held yet: that pass did not see it)."""
    if entry.closed_by is not None:
        return True  # closed already, by an earlier pass
    verdict = admission.decide(view, entry.pod, entry.conn)
    if not isinstance(verdict, Refusal) or verdict.failure is not FailureReason.DENIED:
        return True  # (only a policy's denial closes it: a pod missing for a moment from the state does not)
    entry.close(verdict)
    conn = entry.conn
    log.info("closed an inbound connection to %s from %s:%d (%s) that is now refused: %s",
             entry.pod.key, conn.source_ip, conn.source_port, conn.peer or "no identity", verdict.reason)
    return False


class Rechecker:
    """Runs `recheck` on the engine after authorization updates, one pass at a time: an update while no
    pass is pending schedules one; the updates that come before it runs are covered by it, since it reads
    the newest state (one that comes while it runs schedules the next)."""

    def __init__(self, engine: Engine, view: MeshState, admitted: AdmittedConnections) -> None:
        self._engine = engine
        self._view = view
        self._admitted = admitted
        self._lock = threading.Lock()
        self._pending = False
        self.passes = 0  # passes run so far
        self.closed = 0  # connections closed so far

    def on_change(self, kind: str) -> None:
        """`MeshState.on_change`'s listener (from the updating thread)."""
        if kind == AUTHORIZATION:
            self.schedule()

    def schedule(self) -> None:
        with self._lock:
            if self._pending:
                return
            self._pending = True
        try:
            self._engine.call_soon(self._pass)
        except RuntimeError:  # the engine is not running (EngineError) or closed: no connection is open on it
            with self._lock:
                self._pending = False

    def _pass(self) -> None:
        with self._lock:
            self._pending = False
        self.passes += 1
        self.closed += len(recheck(self._view, self._admitted))
