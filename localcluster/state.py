"""Where a local cluster keeps its state, and how commands find it.

Every cluster has one directory, `<state root>/<cluster name>/`, holding `cluster.json` (the record of
everything `up` created, so that `down` removes exactly that), the pods' logs under `logs/`, and one
sub-directory per mesh component (`controlplane/`, `nodes/<node>/`: the node's token and, as the agent's
`/var/run/ambient`, its CNI socket and its state in `nodeagent/`; `cni/<node>/`: the node's CNI configuration,
host-local's state and the CNI runtime's cache; `pods/<pod>/`: the emptyDir volumes of the mesh's own pods).  The state root is
`/run/ambient-mesh` unless the environment variable `MESH_STATE_DIR` says otherwise (tests use that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mesh import defaults
from mesh.errors import MeshError
from mesh.files import write_atomic

DEFAULT_STATE_ROOT = Path("/run/ambient-mesh")
RECORD_FILE = "cluster.json"


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
    return sorted(p.name for p in root.iterdir() if (p / RECORD_FILE).is_file())


def find_cluster(name: str | None) -> str:
    """The cluster a command means: the one named, or the only one that exists."""
    name = name or os.environ.get("MESH_CLUSTER") or None
    clusters = known_clusters()
    if name is not None:
        if name not in clusters:
            have = ", ".join(clusters) or "none"
            raise ClusterNotFound(f"cluster {name!r} is not up (clusters up: {have})")
        return name
    if not clusters:
        raise ClusterNotFound("no cluster is up: start one with `meshctl cluster up -f FILE`")
    if len(clusters) > 1:
        raise ClusterNotFound(
            f"several clusters are up ({', '.join(clusters)}): choose one with --cluster NAME"
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


def api_socket(name: str | None) -> Path:
    """The apply API socket of cluster `name` (or of the only cluster that is up)."""
    return cluster_dir(find_cluster(name)) / defaults.CONTROLPLANE_DIR / defaults.API_SOCKET
