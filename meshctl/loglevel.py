"""`meshctl log-level TARGET [SPEC]`: show or change the log levels of a running node agent or waypoint.

Both serve `/logging` on their admin endpoint (127.0.0.1:15000 of their network namespace: the node's for
an agent, the waypoint pod's own for a waypoint), as ztunnel does: GET shows the levels, POST
`?level=SPEC` changes them, `?reset` goes back to the level the process started with.  SPEC is LEVEL or
LOGGER=LEVEL items, comma-separated (`mesh.logs`).  TARGET is written as for `meshctl logs`:
nodeagent/NODE, or a waypoint pod in -n NAMESPACE (named as its Gateway).  Needs root.
"""

from __future__ import annotations

import argparse
from typing import Any

from localcluster import state
from localcluster.logs import NODE_AGENT
from mesh import logs
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.errors import UsageError
from meshctl import access
from meshctl.agent import ADMIN_HOST, ADMIN_PORT, call_admin, levels_path, node_netns, render_levels


def waypoint_netns(record: dict[str, Any], namespace: str, name: str) -> str:
    """The network namespace of the waypoint pod `namespace/name` of the cluster `record` describes."""
    waypoints = [p for p in record.get("plan", {}).get("pods", []) if p.get("waypoint")]
    for pod in waypoints:
        if (pod["namespace"], pod["name"]) == (namespace, name):
            return str(pod["netns"])
    for pod in reversed(waypoints):  # a rolled waypoint's pod has a name of its own: found by its gateway's
        if (pod["namespace"], (pod.get("labels") or {}).get(GATEWAY_NAME_LABEL)) == (namespace, name):
            return str(pod["netns"])
    have = ", ".join(f"{p['namespace']}/{p['name']}" for p in waypoints) or "none"
    raise UsageError(f"no waypoint {name!r} in namespace {namespace!r} (waypoints: {have}); a node agent is "
                     "nodeagent/NODE")


def run(args: argparse.Namespace) -> int:
    method, path = levels_path(args.spec, args.reset)
    access.require_root("log-level")
    name = state.find_cluster(args.cluster)
    kind, sep, node = args.target.partition("/")
    if kind == NODE_AGENT and sep:
        ns, where = node_netns(name, node), f"node agent on {node}"
    elif sep:
        raise UsageError(f"{args.target!r}: write nodeagent/NODE, or a waypoint's name with -n NAMESPACE")
    else:
        ns, where = waypoint_netns(state.read_record(name), args.namespace, args.target), \
            f"waypoint {args.namespace}/{args.target}"
    print(render_levels(call_admin(method, path, host=ADMIN_HOST, port=ADMIN_PORT, ns=ns, where=where), where))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("log-level", help="show or change the log levels of a node agent or a waypoint while it runs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  meshctl log-level nodeagent/node-1 debug\n"
                              "  meshctl log-level -n bookinfo waypoint info,waypoint.proxy=debug\n"
                              "  meshctl log-level -n bookinfo waypoint --reset")
    p.add_argument("target", metavar="TARGET", help="nodeagent/NODE, or a waypoint's name (with -n)")
    p.add_argument("spec", nargs="?", metavar="SPEC",
                   help=f"the levels to set: LEVEL or LOGGER=LEVEL, comma-separated ({', '.join(logs.LEVELS)}); "
                        "default: show them")
    p.add_argument("--reset", action="store_true", help="back to the level the process started with")
    p.add_argument("-n", "--namespace", default="default", help="the waypoint's namespace (default: default)")
    p.add_argument("--cluster", help="the cluster (default: the current one, see `meshctl cluster use`)")
    p.set_defaults(func=run)
