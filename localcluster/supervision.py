"""Node agents kept running, as a kubelet keeps a DaemonSet's pods running (`restartPolicy: Always`).

The cluster's controller (`localcluster.controller`) calls `AgentSupervisor.check()` every round.  For
each node agent in the cluster record it decides (pure: `Tracked.observe`) whether the agent must be
started again, then does it (`localcluster.lifecycle.revive_agent`: the same start as `cluster up` and
`agent restart`, with the recorded manifest, flags and capture mode and a new token).  The pods' capture
outlived the agent that died (iptables rules and pinned eBPF programs fail closed), and the new agent
adopts it.

- Backoff (`Backoff`), as the kubelet's CrashLoopBackOff but shorter (a node without its agent is a node
  without a mesh): the n-th restart in a row comes `initial * 2^(n-1)` seconds after the agent was found
  not running (1, 2, 4, ... at most `maximum`, 30 s); an agent that has run `reset_after` seconds (60)
  starts the count again.  A start that fails (the control plane away: no token) counts as a restart
  and waits the next delay.
- The record keeps, in the agent's process entry, `restarts` (how many times it was started again) and
  `lastRestart` (when, UTC); `meshctl cluster status` shows them.  A deliberate `meshctl agent restart`
  is a new pod, as a rollout makes one: its count starts at 0.
- Only a cluster whose `up` has finished is supervised (phase `ready`): until then the record is `up`'s.
- Waypoints are started again by their own controller (`localcluster.waypoints`), the controller itself
  by nobody (it is the cluster's kubelet).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from localcluster import components, lifecycle, processes, state
from localcluster.processes import ProcessRecord

log = logging.getLogger("localcluster.supervision")

AGENT_PREFIX = components.nodeagent_process("")  # "nodeagent "


@dataclass(frozen=True)
class Backoff:
    """How long to wait before each restart in a row, and after how long a run the count starts again."""

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValueError(f"the restart backoff must be above 0 seconds, not {self.initial:g}")
        if self.maximum < self.initial:
            raise ValueError(f"the longest restart backoff ({self.maximum:g}s) is shorter than the first "
                             f"({self.initial:g}s)")
        if not self.reset_after > 0:
            raise ValueError(f"the run that resets the restart count must be above 0 seconds, not {self.reset_after:g}")

    def delay(self, failures: int) -> float:
        """Seconds between finding the process not running and its restart, after `failures` in a row."""
        return min(self.initial * 2 ** min(failures, 32), self.maximum)


@dataclass
class Tracked:
    """What the supervisor knows of one process: which it is, since when it runs, when it was found not
    running, and how many restarts in a row it has had."""

    pid: int
    start_time: int
    since: float  # when this process was started (or first seen)
    failures: int = 0  # restarts in a row without a run of `reset_after`
    down_since: float | None = None

    def observe(self, running: bool, now: float, backoff: Backoff) -> bool:
        """Take one look at the process; True when it must be started again now."""
        if running:
            self.down_since = None
            if now - self.since >= backoff.reset_after:
                self.failures = 0
            return False
        if self.down_since is None:
            self.down_since = now
        return now - self.down_since >= backoff.delay(self.failures)

    def successor(self, rec: ProcessRecord, now: float) -> Tracked:
        """The tracking of the process started in this one's place (one more restart in a row)."""
        return Tracked(rec.pid, rec.start_time, since=now, failures=self.failures + 1)


Revive = Callable[[str, str], ProcessRecord]


class AgentSupervisor:
    """Restarts the node agents of `cluster` that are not running (see the module's docstring)."""

    def __init__(self, cluster: str, backoff: Backoff | None = None, *, revive: Revive = lifecycle.revive_agent,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.backoff = backoff or Backoff()
        self._revive = revive
        self._clock = clock
        self._tracked: dict[str, Tracked] = {}

    def check(self) -> list[str]:
        """One round: the names of the agents started again."""
        record = state.read_record(self.cluster)
        if record.get("phase") != "ready":
            return []
        now = self._clock()
        restarted = []
        for entry in record.get("processes", []):
            if not entry["name"].startswith(AGENT_PREFIX):
                continue
            rec = ProcessRecord.from_json(entry)
            tracked = self._tracked.get(rec.name)
            if tracked is None or (tracked.pid, tracked.start_time) != (rec.pid, rec.start_time):
                tracked = self._tracked[rec.name] = Tracked(rec.pid, rec.start_time, since=now)  # a new pod
            if tracked.observe(_running(rec), now, self.backoff) and self._restart(rec, tracked, now):
                restarted.append(rec.name)
        return restarted

    def _restart(self, rec: ProcessRecord, tracked: Tracked, now: float) -> bool:
        node = rec.name.removeprefix(AGENT_PREFIX)
        try:
            new = self._revive(self.cluster, node)
        except Exception as exc:  # tried again after the next delay
            tracked.failures += 1
            tracked.down_since = now
            log.warning('{"event": "restart failed", "process": "%s", "error": "%s", "retry_in": %g}', rec.name,
                        str(exc).replace('"', "'"), self.backoff.delay(tracked.failures))
            return False
        self._tracked[rec.name] = tracked.successor(new, now)
        with state.record_lock(self.cluster):
            record = state.read_record(self.cluster)
            count = 0
            for i, entry in enumerate(record.get("processes", [])):
                if entry["name"] == rec.name and (entry["pid"], entry["start_time"]) == (rec.pid, rec.start_time):
                    count = int(entry.get("restarts", 0)) + 1
                    record["processes"][i] = _with_restarts(new, count)
            if count:
                state.write_record(self.cluster, record)
        if not count:  # replaced meanwhile (`agent restart`): ours is one too many
            log.warning('{"event": "restart superseded", "process": "%s", "pid": %d}', rec.name, new.pid)
            processes.stop([new.pid])
            return False
        log.info('{"event": "restarted", "process": "%s", "pid": %d, "restarts": %d, "down_seconds": %.1f}',
                 rec.name, new.pid, count, now - (tracked.down_since or now))
        return True


def _with_restarts(rec: ProcessRecord, count: int) -> dict[str, Any]:
    return {**rec.to_json(), "restarts": count, "lastRestart": datetime.now(UTC).isoformat(timespec="seconds")}


def _running(rec: ProcessRecord) -> bool:
    """Whether the recorded process runs; one of ours that exited is reaped first (no zombie is left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(rec.pid, os.WNOHANG)
    return processes.is_running(rec)
