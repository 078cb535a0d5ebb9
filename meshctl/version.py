"""`meshctl version`: the version of meshctl and of what runs in the cluster, as `istioctl version`.

Every component answers `GET /version` (`mesh.serve.endpoints`): the control plane on its debug socket,
each node agent and waypoint on its admin endpoint (127.0.0.1:15000 in its network namespace).  The
answer is what the process runs (the version it started with, not what is installed now), its pid and
start time.  A component that does not answer is listed as such.  Reading the cluster needs root;
`--client` prints meshctl's own version only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from localcluster import state
from mesh.errors import MeshError
from mesh.serve import client
from mesh.serve.endpoints import VERSION_PATH, mesh_version
from mesh.serve.errors import HttpClientError
from meshctl import access
from meshctl.agent import ADMIN_HOST, ADMIN_PORT, call_admin, table
from meshctl.proxystatus import DEBUG_SOCKET


def components(name: str) -> list[dict[str, Any]]:
    """Each component of cluster `name` with what its `/version` says (or `error`)."""
    record = state.read_record(name)
    found: list[dict[str, Any]] = [_controlplane(name)]
    for node in record.get("plan", {}).get("nodes", []):
        found.append(_ask("node agent", node["name"], node["netns"]))
    for pod in record.get("plan", {}).get("pods", []):
        if pod.get("waypoint"):
            found.append(_ask("waypoint", f"{pod['namespace']}/{pod['name']}", pod["netns"]))
    return found


def _controlplane(name: str) -> dict[str, Any]:
    path = state.cluster_dir(name) / DEBUG_SOCKET
    entry: dict[str, Any] = {"component": "control plane", "name": "istiod"}
    try:
        reply = client.get(client.Endpoint.unix(path), VERSION_PATH)
        if reply.status != 200:
            raise ValueError(f"answered {reply.status}: {reply.text.strip()}")
        return entry | dict(reply.json())
    except HttpClientError:
        return entry | {"error": "not answering (is it running?)"}
    except ValueError as exc:
        return entry | {"error": str(exc)}


def _ask(component: str, name: str, netns: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"component": component, "name": name}
    try:
        return entry | call_admin("GET", VERSION_PATH, host=ADMIN_HOST, port=ADMIN_PORT, ns=netns,
                                  where=f"{component} {name}")
    except MeshError as exc:
        return entry | {"error": str(exc)}


def render(mine: str, cluster: str | None, found: list[dict[str, Any]]) -> str:
    lines = [f"client version: {mine}"]
    if cluster is None:
        return "\n".join(lines)
    rows = [[c["component"], c["name"], c.get("version", "-"), str(c.get("pid", "-")), c.get("started", "-"),
             c.get("error", "running")] for c in found]
    lines.append(f"cluster {cluster}:")
    lines.append(table(["COMPONENT", "NAME", "VERSION", "PID", "STARTED", "STATUS"], rows))
    versions = sorted({c["version"] for c in found if "version" in c})
    if len(versions) > 1:
        lines.append(f"note: components run different versions ({', '.join(versions)}): restart the older ones "
                     "(`meshctl agent restart NODE`)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    mine = mesh_version()
    if args.client:
        found, cluster = [], None
    else:
        access.require_root("version")
        cluster = state.find_cluster(args.cluster)
        found = components(cluster)
    if args.output == "json":
        print(json.dumps({"client": {"version": mine}, "cluster": cluster, "components": found}, indent=2))
    else:
        print(render(mine, cluster, found))
    return 1 if any("error" in c for c in found) else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("version", help="the version of meshctl and of the control plane, node agents and waypoints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client", action="store_true", help="only meshctl's own version (no cluster is read)")
    p.add_argument("--cluster", help="the cluster (default: the current one, see `meshctl cluster use`)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=run)
