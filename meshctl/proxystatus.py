"""`meshctl proxy-status`: the discovery clients connected to the control plane and their sync state.

It reads `/debug/connections` from the control plane's local-only debug socket,
`<cluster state dir>/controlplane/debug.sock` (or the socket / URL given).  Per client and resource
type it shows SYNCED (everything sent to it ACKed), STALE (a push not ACKed yet), NACK (the client
refused the last change and keeps its previous configuration) or "-" (not subscribed).  ACKED VERSION
is the control plane version the client last ACKed.  Every client listed was authenticated: NAME, ROLE
and NODE are those its token gives (NAME: `nodeagent/NODE`, or a waypoint's `NAMESPACE/NAME`; `-o json`
has the discovery node ids).  Resources the control plane could not translate (left out, the rest
served) are listed at the end.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from pathlib import Path
from typing import Any

from localcluster.state import cluster_dir, find_cluster
from mesh import defaults
from mesh.errors import MeshError
from mesh.serve import client
from mesh.serve.errors import HttpClientError
from mesh.xds.node import parse_id
from meshctl import access

DEBUG_SOCKET = Path(defaults.CONTROLPLANE_DIR) / defaults.DEBUG_SOCKET
TYPE_COLUMNS = ("Workload", "Service", "Authorization", "L7Config")


class ProxyStatusError(MeshError):
    pass


def fetch_connections(socket_path: str | None = None, url: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    where = url or socket_path or "?"
    if url:
        parts = urllib.parse.urlsplit(url)
        endpoint = client.Endpoint.tcp(parts.hostname or "127.0.0.1", parts.port or defaults.CONTROLPLANE_METRICS_PORT)
    else:
        assert socket_path is not None
        endpoint = client.Endpoint.unix(socket_path)
    try:
        reply = client.get(endpoint, "/debug/connections", timeout=timeout)
    except HttpClientError as exc:
        raise ProxyStatusError(f"cannot reach the control plane at {where}: {exc.__cause__} (is it running?)") from None
    if reply.status != 200:
        raise ProxyStatusError(f"control plane at {where} answered {reply.status}: {reply.text.strip()}")
    try:
        data: dict[str, Any] = reply.json()
    except ValueError:
        raise ProxyStatusError(f"control plane at {where} sent something that is not JSON") from None
    return data


def type_state(t: dict[str, Any] | None) -> str:
    """SYNCED: everything sent was ACKed; STALE: a push is not ACKed yet; NACK: the last change of this
    type was refused (the client runs its previous configuration)."""
    if t is None:
        return "-"
    if t.get("nack"):
        return "NACK"
    if t.get("pending"):
        return "STALE"
    return "SYNCED" if t.get("acked_version") else "NOT ACKED"


def display_name(c: dict[str, Any]) -> str:
    """A client as the other verbs name it: `nodeagent/node-1` (as `meshctl logs`), `bookinfo/waypoint`;
    an id that follows no convention as it is."""
    node_id = str(c.get("node_id", ""))
    role, node, name, namespace = parse_id(node_id)
    if name and namespace:
        return f"{namespace}/{name}"
    if role and node:
        return f"{role}/{node}"
    return node_id or "-"


def render(data: dict[str, Any]) -> str:
    current = data.get("version", "")
    header = ["NAME", "ROLE", "NODE", *[c.upper() for c in TYPE_COLUMNS], "ACKED VERSION"]
    rows = [header]
    nacks: list[str] = []
    for c in data.get("clients", []):
        by_short = {url.rsplit(".", 1)[-1]: t for url, t in c.get("types", {}).items()}
        rows.append(
            [
                display_name(c),
                c.get("role", "") or "-",
                c.get("node", "") or "-",
                *[type_state(by_short.get(col)) for col in TYPE_COLUMNS],
                c.get("acked_version") or "-",
            ]
        )
        for short, t in sorted(by_short.items()):
            nack = t.get("nack")
            if nack:
                names = ", ".join(nack.get("names", [])) or "-"
                nacks.append(
                    f"{c.get('node_id', '')} {short}: NACK of version {nack.get('version', '')} "
                    f"({names}): {nack.get('error', '')}"
                )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"control plane version {current or '-'}, {len(rows) - 1} client(s)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if nacks:
        lines.append("")
        lines.append("Rejected updates (clients keep their previous configuration):")
        lines += [f"  {n}" for n in nacks]
    errors = data.get("errors") or []
    if errors:
        lines.append("")
        lines.append("Configuration the control plane could not translate (left out; everything else is served):")
        lines += [f"  {e}" for e in errors]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.url:
        data = fetch_connections(url=args.url)
    elif args.socket:
        data = fetch_connections(socket_path=args.socket)
    else:
        access.require_root("proxy-status")
        data = fetch_connections(socket_path=str(cluster_dir(find_cluster(args.cluster)) / DEBUG_SOCKET))
    if args.output == "json":
        print(json.dumps(data, indent=2))
    else:
        print(render(data))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "proxy-status",
        help="list discovery clients (node agents, waypoints) with their last ACKed version and any NACK",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cluster", help="cluster name (default: the only cluster up)")
    p.add_argument("--socket", help="the control plane's debug socket (default: found from the cluster)")
    p.add_argument("--url", help="read from the control plane's HTTP port instead, e.g. http://127.0.0.1:15014")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=run)
