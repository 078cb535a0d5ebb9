"""Restarting a node agent refuses no connection, in both capture modes (security issue, item 15).

Under ~200 new connections a second from a meshed pod on node-1 to a meshed service on node-2 (and a
few long-lived connections), `meshctl agent restart` replaces the destination's agent, then the
source's: each new agent starts beside the old one and shares its ports, and the old one drains once
the new one is ready.  Not one request fails; a long-lived connection keeps working until the old
agent's drain deadline (`--drain-seconds`, the DaemonSet's 5) and is closed only then, its bytes intact.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Meshctl, cluster_file
from tests.integration.test_mesh import BOOKINFO_PODS, ECHO, PODTOOLS, Mesh, eventually

RATE = 200  # new connections a second
MOST_SECONDS = 150.0  # the load's longest run; the test ends it sooner (its stop file), once it has what it needs
DRAIN = 5.0  # the DaemonSet's --drain-seconds
CARRY_ON = 3.0  # seconds the load goes on after the last old agent's drain deadline
LONG = 3  # long-lived connections, a line every 0.2 s each
RESTARTED = ("node-2", "node-1")  # the destination's agent, then the source's


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def cluster(request: pytest.FixtureRequest, meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mode = request.param
    name = f"t-hitless-{os.getpid()}" + ("-ebpf" if mode == "ebpf" else "")
    path = cluster_file(tmp_path_factory.mktemp("hitless"), name)
    path.write_text(path.read_text() + ECHO)
    m = Mesh(name, meshctl, mode)
    try:
        meshctl("cluster", "up", "-f", str(path), "--redirect-mode", mode, timeout=300)
        m.ctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")

        def all_enrolled() -> bool:
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(f"bookinfo/{p}") == "enrolled" for p in BOOKINFO_PODS)

        eventually(all_enrolled, timeout=30)
        yield m
    finally:
        meshctl("cluster", "down", name, check=False)


def agent_events(mesh: Mesh, node: str, event: str) -> list[tuple[float, dict]]:
    """The agent log's `{"event": ...}` lines of that kind: (Unix time, the line's JSON)."""
    found = []
    for line in mesh.agent_log(node).splitlines():
        head, _, payload = line.partition(" INFO nodeagent ")
        if payload.startswith(f'{{"event": "{event}"'):
            when = datetime.datetime.strptime(head, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
            found.append((when, json.loads(payload)))
    return found


def test_restarting_both_agents_under_load_fails_no_request(cluster: Mesh, pod_files: Callable[[str], Path]) -> None:
    """The load runs until both restarts are done and the last old agent's drain deadline has passed,
    and a little longer: a slow machine makes the test longer, not the load too short to show anything."""
    before = {node: cluster.agent(node)["pid"] for node in RESTARTED}
    stop_file = pod_files("hitless") / "stop"
    load = cluster.meshctl.popen("exec", "--cluster", cluster.name, "-n", "bookinfo", "sleep", "--", sys.executable,
                                 str(PODTOOLS / "load.py"), "echo", "7000", "--rate", str(RATE),
                                 "--duration", str(MOST_SECONDS), "--stop-file", str(stop_file), "--long", str(LONG))
    try:
        started = time.monotonic()
        time.sleep(3)  # the load is on before the first restart
        for node in RESTARTED:
            out = cluster.ctl("agent", "restart", node)
            assert "replaced" in out.stdout
        time.sleep(DRAIN + CARRY_ON)
        assert time.monotonic() - started < MOST_SECONDS - 5, "the restarts outlasted the load"
        stop_file.touch()
        output, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["stopped_by_file"], result
    seconds = result["seconds"]

    # Not one request failed, and the load ran at its rate throughout.
    assert result["failed"] == 0, f"failed requests: {result['errors']}"
    assert result["ok"] >= 0.9 * RATE * seconds, result

    # Each node's agent was replaced: the new one adopted the pods' capture, the old one drained and exited.
    for node in RESTARTED:
        assert cluster.agent(node)["pid"] != before[node] and cluster.agent(node)["running"]
        assert not Path(f"/proc/{before[node]}").exists()
        assert len(agent_events(cluster, node, "stopping")) == 1 and len(agent_events(cluster, node, "drained")) == 1
    assert any('"event": "enrolled", "pod": "bookinfo/echo"' in line and '"rules": "adopted"' in line
               for line in cluster.agent_log("node-2").splitlines())

    # The long-lived connections kept working until an old agent's drain deadline, and were closed only
    # then (each restart's old agent relayed them), their bytes intact; each connected again at once.
    stops = [when for node in RESTARTED for when, _ in agent_events(cluster, node, "stopping")]
    for conn in result["long"]:
        assert conn["mismatched"] == 0 and conn["reconnect_failures"] == 0, conn
        assert conn["exchanges"] >= 0.8 * seconds / 0.2, conn
        for closed in conn["closures"]:
            assert any(stop + DRAIN - 0.5 <= closed <= stop + DRAIN + 3 for stop in stops), \
                f"a long-lived connection was closed at {closed}, not at a drain deadline ({stops} + {DRAIN}s)"
