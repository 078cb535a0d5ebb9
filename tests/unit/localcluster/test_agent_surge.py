"""What `meshctl agent restart` relies on to replace an agent beside the old one: the new process's own
readiness (its listening socket, found from /proc), and the grace the old one gets to drain."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from localcluster import components
from localcluster.components import ComponentError, termination_grace


def test_a_process_listens_on_a_port_only_through_its_own_socket() -> None:
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen(1)
        port = mine.getsockname()[1]
        other = subprocess.Popen([sys.executable, "-c", "import socket, sys; s = socket.socket(); "
                                  "s.bind(('127.0.0.1', 0)); s.listen(1); print(s.getsockname()[1], flush=True); "
                                  "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout is not None
            theirs = int(other.stdout.readline())
            assert components._listens_on(other.pid, theirs)
            assert not components._listens_on(other.pid, port)  # ours, not theirs
            assert components._listens_on(os.getpid(), port) and not components._listens_on(os.getpid(), theirs)
        finally:
            other.kill()
            other.wait()


def test_the_old_agent_gets_the_daemonsets_grace_to_drain() -> None:
    agent = components.load_workloads().node_agent
    assert termination_grace(agent) == 30.0
    args = agent.container("nodeagent")["args"]
    assert float(args[args.index("--drain-seconds") + 1]) < termination_grace(agent)


def test_a_grace_that_is_not_a_number_is_refused() -> None:
    agent = components.load_workloads().node_agent
    agent.pod_spec()["terminationGracePeriodSeconds"] = "soon"
    with pytest.raises(ComponentError, match="terminationGracePeriodSeconds"):
        termination_grace(agent)
