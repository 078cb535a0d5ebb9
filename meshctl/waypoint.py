"""`meshctl waypoint apply|delete|list|status|config`: waypoints as istioctl manages them, without dropping traffic.

A waypoint is a Gateway of class `istio-waypoint` with one listener `mesh` on port 15008, protocol HBONE,
labelled `istio.io/waypoint-for` (which traffic it takes).  `--enroll-namespace` also labels the
namespace `istio.io/use-waypoint=<name>` so its services' traffic goes through the waypoint.

The order of the steps is what keeps traffic flowing (make before break):

- apply: write the Gateway (over an existing one, what it is not given stays: an earlier `--workers`,
  `--engine` or `--drain-seconds`, and the labels and annotations an operator put on it); wait (`--wait`,
  the default, up to `--timeout`) until a pod of the waypoint is Ready (it listens, has its certificate and
  its first configuration); only then bind the namespace.
  Binding earlier sent the namespace's traffic to a waypoint with no instance (503 "has no ready
  instance") or one not yet listening (connection reset).  On a running waypoint, a change of
  `--workers`, `--engine` or `--drain-seconds` rolls its pod (`localcluster.waypoints`): the wait is then
  for a Ready pod that runs with the new flags (its command line, as registered).
- delete: unbind the namespace first (remove the label naming the waypoint), wait until every node agent
  has ACKed the configuration without it (`/debug/connections`, what `proxy-status` reads), then delete
  the Gateway: the waypoint, no longer sent new connections, drains (requests in flight finish, up to
  its drain time, `apply --drain-seconds`) and stops.  With `--wait`, until its pod is gone.

READY is the waypoint's pods that are Ready over the pods it has (`status.conditions` of its Pods, labelled
`gateway.networking.k8s.io/gateway-name`); status's WORKERS and ENGINE are the flags its pod runs with.

config reads what a running waypoint holds (its admin `/config_dump`, on 127.0.0.1:15000 of the waypoint
pod's network namespace, entered as `meshctl agent` enters a node's): services, routes, destination rules,
authorization policies, and the resources it refused, as text, JSON or YAML.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from controlplane.config.store import BUILTIN_NAMESPACES
from localcluster import state
from localcluster.state import api_socket
from localcluster.waypoints import (
    DEFAULT_ENGINE,
    DRAIN_ANNOTATION,
    ENGINE_ANNOTATION,
    MAX_DRAIN_SECONDS,
    MAX_WORKERS,
    WORKERS_ANNOTATION,
    WaypointPod,
    desired,
    pod_flags,
    runs_as_wanted,
)
from mesh import defaults
from mesh.api.client import ApiClient
from mesh.api.errors import NotFound, ValidationError
from mesh.api.kinds_gateway import (
    DEFAULT_WAYPOINT_NAME,
    GATEWAY_NAME_LABEL,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_FOR_VALUES,
    is_waypoint,
    waypoint_gateway,
)
from mesh.api.validate import Document
from mesh.errors import MeshError, UsageError
from mesh.serve import client as http
from mesh.serve.errors import HttpClientError
from mesh.xds import resources as rs
from mesh.xds.node import ROLE_NODEAGENT
from meshctl import access
from meshctl.agent import ADMIN_HOST, ADMIN_PORT, call_admin, parse_address
from meshctl.config import add_connection_args, client_from, report
from meshctl.loglevel import waypoint_netns
from waypoint.options import ENGINES

DEFAULT_TIMEOUT = 60.0  # seconds: --timeout of apply, delete and status
POLL = 0.2  # seconds between two looks while waiting
CONFIG_DUMP_PATH = "/config_dump"  # the waypoint's admin endpoint (`waypoint.admin`)


class WaypointError(MeshError):
    pass


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    top = sub.add_parser(
        "waypoint", help="create, delete and list waypoints (L7 proxies for a namespace)",
        description="Manage waypoints: Gateways of class istio-waypoint that take a namespace's L7 traffic.")
    wsub = top.add_subparsers(dest="waypoint_verb", metavar="ACTION")
    top.set_defaults(func=lambda args: top.print_help() or 2)

    p = wsub.add_parser(
        "apply", help="create or update a waypoint in a namespace",
        description="Write the waypoint Gateway (listener mesh, port 15008, protocol HBONE) in NAMESPACE and, "
                    "by default, wait until it is ready. With --enroll-namespace the namespace is bound to it "
                    "only once it is ready, so no request is sent to a waypoint that cannot take it yet.",
        epilog="example:\n  meshctl waypoint apply -n bookinfo --enroll-namespace",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--namespace", required=True, metavar="NS", help="namespace of the waypoint")
    p.add_argument("--name", default=DEFAULT_WAYPOINT_NAME, help=f"name of the waypoint (default: {DEFAULT_WAYPOINT_NAME})")
    p.add_argument("--for", dest="traffic_type", default="service", choices=WAYPOINT_FOR_VALUES,
                   help="which traffic the waypoint takes (default: service)")
    p.add_argument("--enroll-namespace", action="store_true",
                   help=f"label the namespace {USE_WAYPOINT_LABEL}=NAME, once the waypoint is ready")
    _wait_args(p, "wait until the waypoint is ready (the default; needed before --enroll-namespace)")
    p.add_argument("--drain-seconds", type=_seconds, metavar="SECONDS",
                   help="how long the waypoint lets requests in flight finish when it is deleted "
                        f"(0 to {MAX_DRAIN_SECONDS:g}; written as the Gateway's infrastructure annotation "
                        f"{DRAIN_ANNOTATION})")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"worker processes of the waypoint, sharing its port (1 to {MAX_WORKERS}; written as the "
                        f"Gateway's infrastructure annotation {WORKERS_ANNOTATION}; the local cluster's default is 1; "
                        "a change rolls a running waypoint's pod, and --wait waits for the new one)")
    p.add_argument("--engine", metavar="|".join(ENGINES),
                   help=f"what moves the waypoint's data path's bytes ({DEFAULT_ENGINE}, the waypoint's "
                        "default, or trio for all of it on trio; written as the Gateway's infrastructure "
                        f"annotation {ENGINE_ANNOTATION}; a change rolls a running waypoint's pod, and --wait "
                        "waits for the new one)")
    add_connection_args(p)
    p.set_defaults(func=cmd_apply)

    p = wsub.add_parser("delete", help="delete waypoints, unbinding them first",
                        description="Delete waypoints by name (default: waypoint), or all of a namespace with --all. "
                                    f"A namespace label {USE_WAYPOINT_LABEL} that names a deleted waypoint is removed "
                                    "first, and the waypoint is deleted only once every node agent has that change, "
                                    "so it drains instead of dropping requests.")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-n", "--namespace", required=True, metavar="NS")
    p.add_argument("--all", action="store_true", help="delete every waypoint in the namespace")
    _wait_args(p, "wait until the node agents have the unbinding (always) and the waypoint pods are gone")
    add_connection_args(p)
    p.set_defaults(func=cmd_delete)

    p = wsub.add_parser("list", help="list waypoints", description="List waypoints with the traffic they take and "
                                                                   "how many of their pods are ready.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", metavar="NS", help="namespace (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    add_connection_args(p)
    p.set_defaults(func=cmd_list)

    p = wsub.add_parser("status", help="show whether waypoints are ready and what uses them",
                        description="Show the waypoints of NAMESPACE (or the one named): ready pods, their "
                                    "addresses, and the namespaces and services bound to each. Exits 1 if a "
                                    "waypoint is not ready (after --timeout with --wait).")
    p.add_argument("-n", "--namespace", required=True, metavar="NS")
    p.add_argument("--name", help="only this waypoint")
    p.add_argument("--wait", action="store_true", help="wait until every waypoint shown is ready")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long --wait waits (default: {DEFAULT_TIMEOUT:g})")
    add_connection_args(p)
    p.set_defaults(func=cmd_status)

    p = wsub.add_parser("config", help="show a waypoint's configuration as the waypoint holds it",
                        description="Read the configuration a running waypoint holds (its admin /config_dump, "
                                    "127.0.0.1:15000 in the waypoint pod's network namespace): the services it "
                                    "routes to, its routes (VirtualServices and HTTPRoutes by host), destination "
                                    "rules, authorization policies, and what it refused. Needs root, unless "
                                    "--admin-address is given.",
                        epilog="examples:\n  meshctl waypoint config -n bookinfo\n"
                               "  meshctl waypoint config -n bookinfo reviews-waypoint -o yaml",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", default=DEFAULT_WAYPOINT_NAME, metavar="NAME",
                   help=f"the waypoint (default: {DEFAULT_WAYPOINT_NAME})")
    p.add_argument("-n", "--namespace", required=True, metavar="NS", help="namespace of the waypoint")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text",
                   help="output format (default: text)")
    p.add_argument("--admin-address", metavar="HOST:PORT",
                   help="read the waypoint's admin endpoint at this address (no namespace is entered)")
    p.add_argument("--cluster", help="the cluster (default: the current one, see `meshctl cluster use`)")
    p.set_defaults(func=cmd_config)


def _wait_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--wait", dest="wait", action="store_true", default=True, help=what)
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="write the change and return at once (traffic may fail while it takes effect)")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait (default: {DEFAULT_TIMEOUT:g})")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds from 0 to 86400")
    return value


# ---- what the store says about a waypoint -------------------------------------------------------------

def pods_of(client: ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in client.get("Pod", namespace)
            if ((p.get("metadata") or {}).get("labels") or {}).get(GATEWAY_NAME_LABEL) == name]


def pod_ready(pod: dict[str, Any]) -> bool:
    """Ready as the kubelet reports it: the `Ready` condition True (a pod without conditions counts as
    ready once it runs and has an address, as translation counts it)."""
    status = pod.get("status") or {}
    if status.get("phase", "Running") != "Running" or not status.get("podIP"):
        return False
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("status")) == "True"
    return True


def pod_command(pod: dict[str, Any]) -> list[str]:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return [str(a) for a in containers[0].get("command") or []]


def pod_workers(pod: dict[str, Any]) -> str:
    """The `--workers` a waypoint pod runs with (its registered command line), or "-" when it does not say."""
    return pod_flags(pod_command(pod)).get("--workers", "-")


def pod_engine(pod: dict[str, Any]) -> str:
    """The `--engine` a waypoint pod runs with (its registered command line), or "-" when it does not say."""
    return pod_flags(pod_command(pod)).get("--engine", "-")


def rolled(client: ApiClient, namespace: str, name: str, wanted: WaypointPod | None) -> bool:
    """A pod of the waypoint is Ready and runs with the flags `wanted` (None: any Ready pod will do)."""
    return any(pod_ready(p) and (wanted is None or runs_as_wanted(wanted, pod_command(p)))
               for p in pods_of(client, namespace, name))


def readiness(client: ApiClient, namespace: str, name: str) -> tuple[int, int]:
    """(ready pods, pods) of a waypoint."""
    pods = pods_of(client, namespace, name)
    return sum(1 for p in pods if pod_ready(p)), len(pods)


def _wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise WaypointError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL)


def _waypoints(client: ApiClient, namespace: str | None) -> list[dict[str, Any]]:
    return [g for g in client.get("Gateway", namespace) if is_waypoint(g)]


def _namespace_labels(client: ApiClient, namespace: str) -> dict[str, str]:
    try:
        found = client.get("Namespace", None, namespace)
    except NotFound:
        return {}
    return dict((found[0].get("metadata") or {}).get("labels") or {})


def require_namespace(client: ApiClient, namespace: str) -> None:
    """NotFound, in kubectl's words, unless `namespace` exists (or is one that always does)."""
    if namespace in BUILTIN_NAMESPACES:
        return
    try:
        client.get("Namespace", None, namespace)
    except NotFound:
        raise NotFound(f'namespaces "{namespace}" not found') from None


def bound_to(client: ApiClient, namespace: str, name: str) -> list[str]:
    """What sends its traffic through waypoint namespace/name: namespaces, services and pods whose
    `istio.io/use-waypoint` names it (`Kind ns/name`, or `Namespace name`)."""
    out = []
    for kind in ("Namespace", "Service", "Pod"):
        for body in client.get(kind):
            meta = body.get("metadata") or {}
            labels = meta.get("labels") or {}
            own_ns = meta.get("namespace") or meta.get("name")
            if labels.get(USE_WAYPOINT_LABEL) == name and labels.get(USE_WAYPOINT_NAMESPACE_LABEL, own_ns) == namespace:
                out.append(f"{kind} {meta['name']}" if kind == "Namespace" else f"{kind} {meta['namespace']}/{meta['name']}")
    return out


# ---- the agents' side ------------------------------------------------------------------------------------

def debug_socket(args: argparse.Namespace) -> Path:
    """The control plane's debug socket, beside its apply API socket."""
    api = Path(args.socket) if args.socket else api_socket(args.cluster)
    return api.parent / defaults.DEBUG_SOCKET


def connections(path: Path) -> dict[str, Any]:
    try:
        reply = http.get(http.Endpoint.unix(path), "/debug/connections", timeout=5.0)
    except HttpClientError as exc:
        raise WaypointError(f"cannot read the node agents' sync state at {path}: {exc}") from None
    if reply.status != 200:
        raise WaypointError(f"the control plane answered {reply.status} for its sync state: {reply.text.strip()}")
    data: dict[str, Any] = reply.json()
    return data


def agents_have_moved_on(data: dict[str, Any], before: str) -> bool:
    """The control plane has published a version after `before` and every node agent has ACKed its
    services and workloads (nothing pending, nothing refused)."""
    if data.get("version", "") == before:
        return False
    for c in data.get("clients", []):
        if c.get("role") != ROLE_NODEAGENT:
            continue
        for url, t in (c.get("types") or {}).items():
            if url in (rs.SERVICE, rs.WORKLOAD) and (t.get("pending") or t.get("nack")):
                return False
    return True


def _existing(client: ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found = client.get("Gateway", namespace, name)
    except NotFound:
        return None
    return found[0] if found and is_waypoint(found[0]) else None


def keeping(existing: dict[str, Any] | None, body: dict[str, Any]) -> dict[str, Any]:
    """`body` (the Gateway as `apply` writes it) over the waypoint's `existing` Gateway: the labels and
    annotations it has (of its metadata and of `spec.infrastructure`) stay unless `apply` sets them, so
    `apply --drain-seconds 10` leaves an earlier `--workers 2` (and an operator's own annotations) in place."""
    if existing is None:
        return body
    meta, spec = existing.get("metadata") or {}, existing.get("spec") or {}
    for key in ("labels", "annotations"):
        if meta.get(key):
            body["metadata"][key] = {**meta[key], **body["metadata"].get(key, {})}
    infrastructure = {key: dict(value) for key, value in (spec.get("infrastructure") or {}).items()
                      if key in ("labels", "annotations") and value}
    if infrastructure:
        body["spec"]["infrastructure"] = infrastructure
    return body


# ---- verbs -----------------------------------------------------------------------------------------------

def cmd_apply(args: argparse.Namespace) -> int:
    client = client_from(args)
    require_namespace(client, args.namespace)
    body = keeping(_existing(client, args.namespace, args.name),
                   waypoint_gateway(args.namespace, args.name, args.traffic_type))
    if args.drain_seconds is not None:
        if args.drain_seconds > MAX_DRAIN_SECONDS:
            raise UsageError(f"--drain-seconds: at most {MAX_DRAIN_SECONDS:g}")
        body["spec"].setdefault("infrastructure", {}).setdefault("annotations", {})[DRAIN_ANNOTATION] = \
            f"{args.drain_seconds:g}"
    if args.workers is not None:
        if not 1 <= args.workers <= MAX_WORKERS:
            raise UsageError(f"--workers {args.workers}: give a number of processes from 1 to {MAX_WORKERS}")
        body["spec"].setdefault("infrastructure", {}).setdefault("annotations", {})[WORKERS_ANNOTATION] = \
            str(args.workers)
    if args.engine is not None:
        if args.engine not in ENGINES:
            raise UsageError(f"--engine {args.engine}: give one of {', '.join(ENGINES)}")
        body["spec"].setdefault("infrastructure", {}).setdefault("annotations", {})[ENGINE_ANNOTATION] = \
            args.engine
    try:
        client.apply([Document("waypoint", 1, body)])
    except ValidationError as exc:
        raise report(exc, "applied") from exc
    print(f"waypoint {args.namespace}/{args.name} applied")
    if args.wait:
        wanted = desired([body]).get(f"{args.namespace}/{args.name}")
        _wait_for(f"waypoint {args.namespace}/{args.name} to be ready (see `meshctl waypoint status -n "
                  f"{args.namespace}` and the waypoint's log)",
                  lambda: rolled(client, args.namespace, args.name, wanted), args.timeout)
        print(f"waypoint {args.namespace}/{args.name} is ready")
    if args.enroll_namespace:
        if not args.wait:
            print(f"warning: binding namespace {args.namespace} without waiting for the waypoint: its traffic "
                  "fails until the waypoint is ready", file=sys.stderr)
        client.label(f"Namespace/{args.namespace}", {USE_WAYPOINT_LABEL: args.name})
        print(f'namespace {args.namespace} labeled with "{USE_WAYPOINT_LABEL}: {args.name}"')
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = client_from(args)
    existing = [g["metadata"]["name"] for g in _waypoints(client, args.namespace)]
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
    ns_labels = _namespace_labels(client, args.namespace)
    if ns_labels.get(USE_WAYPOINT_LABEL) in names:
        # Services (and pods) that follow the namespace's label: unbinding changes what the agents get.
        followers = [b for kind in ("Service", "Pod") for b in client.get(kind, args.namespace)
                     if USE_WAYPOINT_LABEL not in ((b.get("metadata") or {}).get("labels") or {})]
        sock = debug_socket(args)
        wait_agents = args.wait and bool(followers)
        before = connections(sock).get("version", "") if wait_agents else ""
        client.label(f"Namespace/{args.namespace}", remove=[USE_WAYPOINT_LABEL])
        print(f"namespace {args.namespace} label {USE_WAYPOINT_LABEL} removed")
        if wait_agents:
            _wait_for("the node agents to have the namespace's traffic sent without the waypoint "
                      "(see `meshctl proxy-status`)",
                      lambda: agents_have_moved_on(connections(sock), before), args.timeout)
            print("node agents have the change")
    client.delete_refs([f"Gateway/{args.namespace}/{n}" for n in names])
    for n in names:
        print(f"waypoint {args.namespace}/{n} deleted")
    if args.wait:
        _wait_for(f"the pods of waypoint(s) {', '.join(names)} to drain and stop",
                  lambda: not any(pods_of(client, args.namespace, n) for n in names), args.timeout)
        print("waypoint pods drained and stopped")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    client = client_from(args)
    namespace = None if args.all_namespaces else (args.namespace or "default")
    gateways = _waypoints(client, namespace)
    if not gateways:
        print(f"No waypoints found in {'any namespace' if namespace is None else 'namespace ' + namespace}.")
        return 0
    rows = [("NAMESPACE", "NAME", "TRAFFIC TYPE", "READY", "VERSION")]
    for g in gateways:
        meta = g["metadata"]
        ready, total = readiness(client, meta["namespace"], meta["name"])
        rows.append((meta["namespace"], meta["name"], (meta.get("labels") or {}).get(WAYPOINT_FOR_LABEL, "service"),
                     f"{ready}/{total}", str(meta.get("resourceVersion", ""))))
    _print_table(rows)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = client_from(args)
    require_namespace(client, args.namespace)
    gateways = [g for g in _waypoints(client, args.namespace) if args.name in (None, g["metadata"]["name"])]
    if not gateways:
        what = f"waypoint {args.name}" if args.name else "waypoints"
        raise NotFound(f"no {what} in namespace {args.namespace}")
    names = [g["metadata"]["name"] for g in gateways]
    if args.wait:  # until ready or the timeout; then the table says which is not
        with contextlib.suppress(WaypointError):
            _wait_for(f"waypoint(s) {', '.join(names)} to be ready",
                      lambda: all(readiness(client, args.namespace, n)[0] > 0 for n in names), args.timeout)
    rows = [("NAMESPACE", "NAME", "READY", "STATUS", "POD", "NODE", "ADDRESS", "WORKERS", "ENGINE", "USED BY")]
    not_ready = 0
    for name in names:
        pods = pods_of(client, args.namespace, name)
        ready = sum(1 for p in pods if pod_ready(p))
        status = "Ready" if ready else ("NotReady" if pods else "NoPod")
        not_ready += 0 if ready else 1
        users = ", ".join(bound_to(client, args.namespace, name)) or "-"
        first = next((p for p in pods if pod_ready(p)), pods[0] if pods else {})  # a Ready one, while it rolls
        rows.append((args.namespace, name, f"{ready}/{len(pods)}", status,
                     (first.get("metadata") or {}).get("name", "-"), (first.get("spec") or {}).get("nodeName", "-"),
                     (first.get("status") or {}).get("podIP", "-"), pod_workers(first), pod_engine(first),
                     users))
    _print_table(rows)
    if not_ready:
        raise WaypointError(f"{not_ready} waypoint(s) not ready")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.admin_address:
        host, port = parse_address(args.admin_address)
        ns, where = None, f"waypoint at {host}:{port}"
    else:
        access.require_root("waypoint config")
        cluster = state.find_cluster(args.cluster)
        host, port = ADMIN_HOST, ADMIN_PORT
        ns, where = waypoint_netns(state.read_record(cluster), args.namespace, args.name), \
            f"waypoint {args.namespace}/{args.name}"
    dump = call_admin("GET", CONFIG_DUMP_PATH, host=host, port=port, ns=ns, where=where)
    if args.output == "json":
        print(json.dumps(dump, indent=2, sort_keys=True))
    elif args.output == "yaml":
        print(yaml.safe_dump(dump, sort_keys=True, default_flow_style=False), end="")
    else:
        print(render_config(dump))
    return 0


def render_config(dump: dict[str, Any]) -> str:
    """A waypoint's `/config_dump`, readable: a header, then one section per kind of configuration."""
    lines = [f"waypoint {dump.get('waypoint', '?')}   identity {dump.get('identity', '?')}",
             f"configuration version {dump.get('version', 0)}, "
             f"{'synced' if dump.get('synced') else 'NOT synced with the control plane yet'}, "
             f"{dump.get('rejected_updates', 0)} update(s) refused"]

    def section(title: str, rows: list[tuple[str, ...]], empty: str = "none") -> None:
        lines.append("")
        lines.append(title)
        if not rows:
            lines.append(f"  ({empty})")
            return
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.extend("  " + "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    section("SERVICES (clusters)", [(str(s),) for s in dump.get("services") or []])
    routes = dict(dump.get("virtual_services") or {})
    section("ROUTES", [("HOST", "ROUTE"), *sorted((str(h), str(r)) for h, r in routes.items())] if routes else [])
    if "ingress_routes" in dump:
        ingress = dict(dump.get("ingress_routes") or {})
        section("INGRESS ROUTES", [("ROUTE", "HOSTS"), *sorted((str(r), ", ".join(map(str, h)))
                                                                  for r, h in ingress.items())] if ingress else [])
    section("DESTINATION RULES", [(str(d),) for d in dump.get("destination_rules") or []])
    section("AUTHORIZATION POLICIES", [(str(p),) for p in dump.get("authorization_policies") or []])
    tracing = dict(dump.get("tracing") or {})
    lines.append("")
    sampling = tracing.get("sampling")
    lines.append(f"JWT rules: {dump.get('jwt_rules', 0)}   tracing: sampling "
                 f"{'the default' if sampling is None else format(sampling, 'g') + '%'}"
                 f"{'' if tracing.get('reporting', True) else ' (reporting off)'}"
                 f"{' from ' + ', '.join(tracing['telemetry']) if tracing.get('telemetry') else ''}")
    section("WORKLOADS USING THIS WAYPOINT", [(str(w),) for w in dump.get("workloads_using_waypoint") or []])
    rejected = dict(dump.get("rejected_resources") or {})
    if rejected:
        section("REFUSED RESOURCES (left out of the configuration)",
                [("RESOURCE", "WHY"), *sorted((str(r), str(why)) for r, why in rejected.items())])
    if dump.get("warnings"):
        section("WARNINGS", [(str(w),) for w in dump["warnings"]])
    return "\n".join(lines)


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

