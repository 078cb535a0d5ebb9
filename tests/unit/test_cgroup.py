"""cgroup v2 helpers: finding the hierarchy, and a real pod cgroup made, joined and removed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import cgroup

HYBRID = """cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def test_the_v2_hierarchy_is_found_in_the_hybrid_layout() -> None:
    assert cgroup.v2_root(HYBRID) == Path("/sys/fs/cgroup/unified")
    assert cgroup.v2_root("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == Path("/sys/fs/cgroup")


def test_no_v2_hierarchy_says_how_to_mount_one() -> None:
    with pytest.raises(cgroup.CgroupError, match="no cgroup v2 hierarchy is mounted"):
        cgroup.v2_root("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")


@pytest.fixture
def scratch() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = cgroup.v2_root() / f"ambt-unit-{os.getpid()}"
    yield path
    cgroup.remove_tree(path)


def test_a_child_joins_its_cgroup_and_removal_kills_it(scratch: Path) -> None:
    pod = cgroup.create(scratch / "pod.default.a")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             preexec_fn=lambda: cgroup.join_self(pod))
    try:
        assert cgroup.pids(pod) == [child.pid]
        assert cgroup.remove_tree(scratch)
        assert child.wait(timeout=5) != 0
        assert not scratch.exists()
    finally:
        child.kill()
        child.wait()
    assert not cgroup.remove_tree(scratch)  # nothing left: says so
