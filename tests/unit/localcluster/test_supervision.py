"""The node agents' supervisor: when to restart (pure), and the restart itself against real processes.

The "agents" here are real processes (`sleep`) started by `processes.spawn` in the host's namespace and
killed with SIGKILL; only the start of a new agent is the test's (`revive`), since a real one needs a
cluster (tests/integration/test_supervision.py runs that)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import processes, state
from localcluster.processes import ProcessRecord
from localcluster.supervision import AgentSupervisor, Backoff, Tracked

CLUSTER = "t-sup-unit"


def test_backoff_doubles_up_to_its_maximum() -> None:
    b = Backoff(initial=1.0, maximum=5.0)
    assert [b.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.delay(10_000) == 5.0


@pytest.mark.parametrize(("kw", "says"), [
    ({"initial": 0.0}, "above 0 seconds"),
    ({"initial": 5.0, "maximum": 1.0}, "shorter than the first"),
    ({"reset_after": -1.0}, "resets the restart count"),
])
def test_bad_backoffs_are_refused(kw: dict[str, float], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Backoff(**kw)


def test_a_process_is_restarted_after_the_delay_and_the_count_resets_after_a_long_run() -> None:
    b = Backoff(initial=1.0, maximum=8.0, reset_after=60.0)
    t = Tracked(pid=10, start_time=1, since=0.0)
    assert not t.observe(True, 5.0, b)
    assert not t.observe(False, 10.0, b)  # found not running: wait 1 s
    assert t.observe(False, 11.0, b)
    t2 = t.successor(ProcessRecord("nodeagent n1", 11, 2, "", ""), 11.0)
    assert t2.failures == 1
    assert not t2.observe(False, 12.0, b) and not t2.observe(False, 13.5, b)  # the second in a row: 2 s
    assert t2.observe(False, 14.0, b)
    t3 = t2.successor(ProcessRecord("nodeagent n1", 12, 3, "", ""), 14.0)
    assert not t3.observe(True, 80.0, b) and t3.failures == 0  # ran a minute: the count starts again
    assert not t3.observe(False, 81.0, b) and t3.observe(False, 82.0, b)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    home = state.cluster_dir(CLUSTER)
    home.mkdir(parents=True)
    yield home
    processes.stop(processes.marked_pids(CLUSTER))


def _sleeper(home: Path, name: str) -> ProcessRecord:
    return processes.spawn(CLUSTER, name, "", ["sleep", "300"], {"PATH": os.environ["PATH"]}, home / f"{name}.log")


def _kill(pid: int) -> None:
    """kill -9, and wait for it to be gone (it is this test's child: reaped here)."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _write(home: Path, phase: str, *recs: ProcessRecord, extra: tuple[dict[str, object], ...] = ()) -> None:
    state.write_record(CLUSTER, {"name": CLUSTER, "phase": phase,
                                 "processes": [r.to_json() for r in recs] + list(extra)})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_killed_agent_is_started_again_and_counted(cluster: Path) -> None:
    agent = _sleeper(cluster, "nodeagent n1")
    other = _sleeper(cluster, "nodeagent n2")
    controller = {"name": "controller", "pid": 1, "start_time": 0, "netns": "", "log": ""}
    _write(cluster, "ready", agent, other, extra=(controller,))
    revived: list[str] = []

    def revive(name: str, node: str) -> ProcessRecord:
        revived.append(node)
        return _sleeper(cluster, f"nodeagent {node}")

    clock = Clock()
    sup = AgentSupervisor(CLUSTER, Backoff(initial=1.0, maximum=4.0), revive=revive, clock=clock)
    assert sup.check() == []
    _kill(agent.pid)
    clock.now += 0.1
    assert sup.check() == []  # found not running: the backoff's first second
    clock.now += 1.0
    assert sup.check() == ["nodeagent n1"] and revived == ["n1"]
    record = state.read_record(CLUSTER)
    entry = next(p for p in record["processes"] if p["name"] == "nodeagent n1")
    assert entry["restarts"] == 1 and entry["lastRestart"] and entry["pid"] != agent.pid
    assert processes.is_running(ProcessRecord.from_json(entry))
    assert any(p["name"] == "controller" for p in record["processes"])  # the rest of the record kept

    _kill(entry["pid"])  # again at once: the second restart in a row waits 2 s
    clock.now += 0.1
    assert sup.check() == []
    clock.now += 1.5
    assert sup.check() == []
    clock.now += 0.5
    assert sup.check() == ["nodeagent n1"]
    entry = next(p for p in state.read_record(CLUSTER)["processes"] if p["name"] == "nodeagent n1")
    assert entry["restarts"] == 2 and revived == ["n1", "n1"]


def test_a_failed_start_is_tried_again_after_the_next_delay(cluster: Path) -> None:
    agent = _sleeper(cluster, "nodeagent n1")
    _write(cluster, "ready", agent)
    attempts: list[float] = []
    clock = Clock()

    def revive(name: str, node: str) -> ProcessRecord:
        attempts.append(clock.now)
        if len(attempts) == 1:
            raise RuntimeError("the control plane is away")
        return _sleeper(cluster, f"nodeagent {node}")

    sup = AgentSupervisor(CLUSTER, Backoff(initial=1.0), revive=revive, clock=clock)
    _kill(agent.pid)
    sup.check()
    clock.now += 1.0
    assert sup.check() == [] and len(attempts) == 1  # failed: the next try in 2 s
    clock.now += 1.0
    assert sup.check() == [] and len(attempts) == 1
    clock.now += 1.0
    assert sup.check() == ["nodeagent n1"] and len(attempts) == 2


def test_a_cluster_still_coming_up_is_left_alone(cluster: Path) -> None:
    agent = _sleeper(cluster, "nodeagent n1")
    _write(cluster, "building", agent)
    _kill(agent.pid)
    clock = Clock()
    sup = AgentSupervisor(CLUSTER, revive=lambda *_: pytest.fail("restarted during up"), clock=clock)
    for _ in range(3):
        clock.now += 10
        assert sup.check() == []


def test_a_rollout_replacing_the_agent_is_a_new_pod(cluster: Path) -> None:
    agent = _sleeper(cluster, "nodeagent n1")
    _write(cluster, "ready", agent)
    clock = Clock()
    sup = AgentSupervisor(CLUSTER, revive=lambda *_: pytest.fail("nothing to restart"), clock=clock)
    sup.check()
    successor = _sleeper(cluster, "nodeagent n1")  # `meshctl agent restart` recorded a new agent ...
    _write(cluster, "ready", successor)
    processes.stop([agent.pid])  # ... and stopped the old one
    clock.now += 10
    assert sup.check() == []
