"""`meshctl waypoint apply|delete|list`: waypoints as istioctl manages them.

A waypoint is a Gateway of class `istio-waypoint` with one listener `mesh` on port 15008, protocol HBONE,
labelled `istio.io/waypoint-for` (which traffic it takes).  `--enroll-namespace` also labels the
namespace `istio.io/use-waypoint=<name>` so its services' traffic goes through the waypoint.
"""

from __future__ import annotations

import argparse
from typing import Any

from mesh.api.errors import NotFound, ValidationError
from mesh.api.kinds_gateway import (
    DEFAULT_WAYPOINT_NAME,
    USE_WAYPOINT_LABEL,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_FOR_VALUES,
    is_waypoint,
    waypoint_gateway,
)
from mesh.api.validate import Document
from mesh.errors import UsageError
from meshctl.config import add_connection_args, client_from, report


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    top = sub.add_parser(
        "waypoint", help="create, delete and list waypoints (L7 proxies for a namespace)",
        description="Manage waypoints: Gateways of class istio-waypoint that take a namespace's L7 traffic.")
    wsub = top.add_subparsers(dest="waypoint_verb", metavar="ACTION")
    top.set_defaults(func=lambda args: top.print_help() or 2)

    p = wsub.add_parser(
        "apply", help="create or update a waypoint in a namespace",
        description="Write the waypoint Gateway (listener mesh, port 15008, protocol HBONE) in NAMESPACE.",
        epilog="example:\n  meshctl waypoint apply -n bookinfo --enroll-namespace",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--namespace", required=True, metavar="NS", help="namespace of the waypoint")
    p.add_argument("--name", default=DEFAULT_WAYPOINT_NAME, help=f"name of the waypoint (default: {DEFAULT_WAYPOINT_NAME})")
    p.add_argument("--for", dest="traffic_type", default="service", choices=WAYPOINT_FOR_VALUES,
                   help="which traffic the waypoint takes (default: service)")
    p.add_argument("--enroll-namespace", action="store_true",
                   help=f"label the namespace {USE_WAYPOINT_LABEL}=NAME so its traffic uses this waypoint")
    add_connection_args(p)
    p.set_defaults(func=cmd_apply)

    p = wsub.add_parser("delete", help="delete waypoints",
                        description="Delete waypoints by name (default: waypoint), or all of a namespace with --all. "
                                    f"A namespace label {USE_WAYPOINT_LABEL} that names a deleted waypoint is removed.")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-n", "--namespace", required=True, metavar="NS")
    p.add_argument("--all", action="store_true", help="delete every waypoint in the namespace")
    add_connection_args(p)
    p.set_defaults(func=cmd_delete)

    p = wsub.add_parser("list", help="list waypoints", description="List waypoints with the traffic they take.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", metavar="NS", help="namespace (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    add_connection_args(p)
    p.set_defaults(func=cmd_list)


def cmd_apply(args: argparse.Namespace) -> int:
    client = client_from(args)
    body = waypoint_gateway(args.namespace, args.name, args.traffic_type)
    try:
        client.apply([Document("waypoint", 1, body)])
    except ValidationError as exc:
        raise report(exc, "applied") from exc
    print(f"waypoint {args.namespace}/{args.name} applied")
    if args.enroll_namespace:
        client.label(f"Namespace/{args.namespace}", {USE_WAYPOINT_LABEL: args.name})
        print(f'namespace {args.namespace} labeled with "{USE_WAYPOINT_LABEL}: {args.name}"')
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = client_from(args)
    existing = [g["metadata"]["name"] for g in client.get("Gateway", args.namespace) if is_waypoint(g)]
    if args.all:
        if args.names:
            raise UsageError("give either --all or waypoint names, not both")
        names = existing
    else:
        names = args.names or [DEFAULT_WAYPOINT_NAME]
    missing = [n for n in names if n not in existing]
    if missing:
        raise NotFound(f"no waypoint {', '.join(missing)} in namespace {args.namespace}")
    if not names:
        print(f"no waypoints in namespace {args.namespace}")
        return 0
    client.delete_refs([f"Gateway/{args.namespace}/{n}" for n in names])
    for n in names:
        print(f"waypoint {args.namespace}/{n} deleted")
    ns_labels = _namespace_labels(client, args.namespace)
    if ns_labels.get(USE_WAYPOINT_LABEL) in names:
        client.label(f"Namespace/{args.namespace}", remove=[USE_WAYPOINT_LABEL])
        print(f"namespace {args.namespace} label {USE_WAYPOINT_LABEL} removed")
    return 0


def _namespace_labels(client: Any, namespace: str) -> dict[str, str]:
    try:
        found = client.get("Namespace", None, namespace)
    except NotFound:
        return {}
    return dict((found[0].get("metadata") or {}).get("labels") or {})


def cmd_list(args: argparse.Namespace) -> int:
    client = client_from(args)
    namespace = None if args.all_namespaces else (args.namespace or "default")
    gateways = [g for g in client.get("Gateway", namespace) if is_waypoint(g)]
    if not gateways:
        print(f"No waypoints found in {'any namespace' if namespace is None else 'namespace ' + namespace}.")
        return 0
    rows = [("NAMESPACE", "NAME", "TRAFFIC TYPE", "VERSION")]
    for g in gateways:
        meta = g["metadata"]
        rows.append((meta["namespace"], meta["name"], (meta.get("labels") or {}).get(WAYPOINT_FOR_LABEL, "service"),
                     str(meta.get("resourceVersion", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
