"""Where a local cluster keeps its state, and how commands find it.

Every cluster has one directory, `<state root>/<cluster name>/`, holding `cluster.json` (the record of
everything `up` created, so that `down` removes exactly that), the pods' logs under `logs/`, and one
sub-directory per mesh component (`controlplane/`, `nodes/<node>/`: the node's token and, as the agent's
`/var/run/ambient`, its CNI socket and its state in `nodeagent/`; `cni/<node>/`: the node's CNI configuration,
host-local's state and the CNI runtime's cache; `pods/<pod>/`: the emptyDir volumes of the mesh's own pods).  The state root is
`/run/ambient-mesh` unless the environment variable `MESH_STATE_DIR` says otherwise (tests use that).  The
file `current` there names the current cluster (`meshctl cluster use`), which commands use when none is named.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh import defaults
from mesh.errors import MeshError
from mesh.files import write_atomic

DEFAULT_STATE_ROOT = Path("/run/ambient-mesh")
RECORD_FILE = "cluster.json"
RECORD_LOCK_FILE = "cluster.json.lock"
CURRENT_FILE = "current"  # the name of the current cluster (`meshctl cluster use`)
CLUSTER_ENV = "MESH_CLUSTER"  # a cluster to use, over the current one


class ClusterNotFound(MeshError):
    pass


def state_root() -> Path:
    return Path(os.environ.get("MESH_STATE_DIR") or DEFAULT_STATE_ROOT)


def cluster_dir(name: str) -> Path:
    return state_root() / name


def known_clusters() -> list[str]:
    root = state_root()
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        try:
            (p / RECORD_FILE).stat()
        except PermissionError:  # not a silent "no clusters": say why they cannot be seen
            raise MeshError(f"{p}: permission denied: the local clusters' state belongs to root; run it with "
                            "sudo or as root") from None
        except OSError:  # not a cluster's directory (or not a directory)
            continue
        found.append(p.name)
    return sorted(found)


def current_cluster() -> str | None:
    """The cluster `meshctl cluster use` chose (`<state root>/current`), if it is still there."""
    try:
        name = (state_root() / CURRENT_FILE).read_text().strip()
    except OSError:
        return None
    return name if name and name in known_clusters() else None


def set_current(name: str | None) -> None:
    """Make `name` the current cluster (None: none is)."""
    path = state_root() / CURRENT_FILE
    if name is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, (name + "\n").encode())


def find_cluster(name: str | None) -> str:
    """The cluster a command means: the one named (--cluster, else $MESH_CLUSTER), else the current one
    (`meshctl cluster use`), else the only one that exists."""
    name = name or os.environ.get(CLUSTER_ENV) or None
    clusters = known_clusters()
    if name is not None:
        if name not in clusters:
            have = ", ".join(clusters) or "none"
            raise ClusterNotFound(f"cluster {name!r} is not up (clusters up: {have})")
        return name
    if not clusters:
        raise ClusterNotFound("no cluster is up: start one with `meshctl cluster up -f FILE`")
    current = current_cluster()
    if current is not None:
        return current
    if len(clusters) > 1:
        raise ClusterNotFound(
            f"several clusters are up ({', '.join(clusters)}): choose one with `meshctl cluster use NAME`, "
            f"--cluster NAME or ${CLUSTER_ENV}"
        )
    return clusters[0]


def read_record(name: str) -> dict[str, Any]:
    path = cluster_dir(name) / RECORD_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ClusterNotFound(f"cluster {name!r} is not up") from exc
    except (OSError, ValueError) as exc:
        raise MeshError(f"{path}: unreadable cluster record ({exc}); run `meshctl cluster down {name}`") from exc
    return data


def write_record(name: str, record: dict[str, Any]) -> None:
    write_atomic(cluster_dir(name) / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True).encode())


@contextlib.contextmanager
def record_lock(name: str) -> Iterator[None]:
    """Hold the cluster record for a read-modify-write (`agent restart`, the controller's restarts), so
    that two writers do not lose each other's change.  An advisory lock on a file beside the record."""
    with open(cluster_dir(name) / RECORD_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def api_socket(name: str | None) -> Path:
    """The apply API socket of cluster `name` (or of the only cluster that is up)."""
    return cluster_dir(find_cluster(name)) / defaults.CONTROLPLANE_DIR / defaults.API_SOCKET
