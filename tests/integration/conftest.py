"""Fixtures for tests that build real clusters: they need root, and always clean up after themselves.

Every cluster built here is named `t-...` and lives under a temporary state directory, so tests never
touch a cluster a person has running, nor anything outside the `amb.t-` name prefix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localcluster.plan import bpf_prefix, cluster_cgroup
from mesh import cgroup

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "examples" / "bookinfo" / "cluster.yaml"

pytestmark = pytest.mark.root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="integration tests need root (network namespaces, iptables)")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@dataclass
class Meshctl:
    """Runs the real `meshctl` as a user would, against one state directory."""

    state_dir: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MESH_STATE_DIR"] = str(self.state_dir)
        env.pop("MESH_CLUSTER", None)
        return env

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, "-m", "meshctl.main", *args], capture_output=True, text=True,
                             env=self.env(), cwd=ROOT, timeout=timeout, check=False)
        if check and out.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "meshctl.main", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=self.env(), cwd=ROOT)


def leftovers(cluster: str) -> list[str]:
    """Anything of `cluster` still on the machine: namespaces, links, processes."""
    prefix = f"amb.{cluster}."
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"host link {line}" for line in links.splitlines() if prefix in line]
    procs = subprocess.run(["ps", "-e", "-ww", "-o", "pid=,args=", "e"], capture_output=True, text=True).stdout
    found += [f"process {line.strip()}" for line in procs.splitlines() if f"AMB_CLUSTER={cluster} " in line + " "]
    if Path("/etc/netns").is_dir():
        found += [f"/etc/netns/{p.name}" for p in Path("/etc/netns").iterdir() if p.name.startswith(prefix)]
    cgroups = cgroup.v2_root() / cluster_cgroup(cluster)
    found += [f"cgroup {cgroups}"] if cgroups.exists() else []
    pins = Path("/sys/fs/bpf") / bpf_prefix(cluster)
    found += [f"pinned eBPF objects {pins}"] if pins.exists() else []
    return found


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def pod_files() -> Iterator[Callable[[str], Path]]:
    """Directories whose files the pods can read: `pod_files("tools")` (a new one on each call).

    A pod runs as its own user (`localcluster.sandbox`), and pytest's temporary directories are private to
    root from /tmp/pytest-of-root down (the sandbox even covers that directory), so scripts a test writes
    for its pods go here instead: under /tmp, traversable and readable by all, removed after the session."""
    root = Path(tempfile.mkdtemp(prefix="amb-pod-files-"))
    root.chmod(0o755)

    def make(name: str) -> Path:
        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        directory.chmod(0o755)
        return directory

    yield make
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def meshctl(state_dir: Path) -> Meshctl:
    return Meshctl(state_dir)


def two_node_cluster(name: str) -> str:
    """The Cluster document most test clusters start with: `node-1` and `node-2` with their pod CIDRs and
    the default service CIDR, ending with the `---` before the next document."""
    return (f"apiVersion: mesh.local/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n"
            "  serviceCIDR: 10.96.0.0/16\n  nodes:\n  - name: node-1\n    podCIDR: 10.244.1.0/24\n"
            "  - name: node-2\n    podCIDR: 10.244.2.0/24\n---")


def cluster_file(tmp: Path, name: str, source: Path = BOOKINFO) -> Path:
    """A copy of a cluster file under another cluster name; the pods still run the example's app."""
    text = source.read_text().replace("name: bookinfo\nspec:", f"name: {name}\nspec:", 1)
    path = tmp / f"{name}.yaml"
    path.write_text(text.replace("command: [python3, app.py]", f"command: [{sys.executable}, {source.parent / 'app.py'}]"))
    return path


@pytest.fixture(scope="module")
def bookinfo(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bookinfo cluster, built once per test module and always removed."""
    name = "t-bookinfo"
    path = cluster_file(tmp_path_factory.mktemp("bookinfo"), name)
    try:
        meshctl("cluster", "up", "-f", str(path))
        yield name
    finally:
        meshctl("cluster", "down", name, check=False)
