"""`meshctl cluster up|down|status|list|use`: the local multi-node cluster on network namespaces, and the
current one (the cluster a command means when it names none)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from localcluster import lifecycle, spec, state
from mesh import defaults
from mesh.errors import UsageError
from meshctl import access

HELP_UP = """Build a local cluster from a cluster file: a network namespace per node and per pod, pods wired
by CNI plugins (Debian's bridge, host-local and loopback, then the mesh's ambient-cni, which hands each pod
to its node's agent), routes between nodes over an underlay, ClusterIP services, names resolvable
inside pods, and each pod's command started in its namespace. The control plane and one node agent per
node are started from daemonset/'s Deployment and DaemonSet, as a kubelet would (see them with `meshctl get
daemonset,deployment -A`). Prometheus (Debian's) scrapes every component from the underlay (`cluster
status` says where). Needs root."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cluster", help="build, inspect and remove a local multi-node cluster",
                       description="Build, inspect and remove a local multi-node cluster on network namespaces.")
    verbs = p.add_subparsers(dest="cluster_verb", metavar="VERB", required=True)

    up = verbs.add_parser("up", help="build a cluster from a cluster file", description=HELP_UP)
    up.add_argument("-f", "--file", required=True, metavar="FILE", help="the cluster file (YAML)")
    up.add_argument("--wait", type=float, default=lifecycle.DEFAULT_READY_TIMEOUT, metavar="SECONDS",
                    help="how long to wait for every pod's ports to listen (default %(default)s)")
    up.add_argument("--redirect-mode", choices=defaults.REDIRECT_MODES, metavar="MODE",
                    help="how every node agent captures its pods: iptables or ebpf (default: the cluster "
                         "file's spec.mesh.redirectMode and per-node redirectMode, else iptables)")
    up.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="an extra flag for every node agent, e.g. --agent-arg=--cert-ttl=60 (repeatable)")
    up.add_argument("--scrape-interval", type=float, metavar="SECONDS",
                    help="how often Prometheus scrapes every component (default: the cluster file's "
                         "spec.observability.prometheus.scrapeInterval, else 5)")
    up.add_argument("--no-prometheus", action="store_true", help="do not run Prometheus")
    up.add_argument("--otlp-endpoint", metavar="URL",
                    help="where node agents and waypoints send spans (OTLP/HTTP), e.g. "
                         "http://172.30.0.1:4318/v1/traces for a collector on the underlay (default: the cluster "
                         "file's spec.observability.tracing.otlpEndpoint, else none)")
    up.set_defaults(func=cmd_up)

    down = verbs.add_parser("down", help="remove a cluster and everything it made",
                            description="Stop a cluster's processes and remove its namespaces, links, rules "
                                        "and files. Also cleans what a crashed `up` left behind.")
    down.add_argument("name", nargs="?", help="the cluster (default: the current one)")
    down.add_argument("--cluster", metavar="NAME", help="the cluster (the same as NAME)")
    down.set_defaults(func=cmd_down)

    st = verbs.add_parser("status", help="show nodes, pods and services of a cluster",
                          description="Show a cluster's nodes, pods (with liveness) and services.")
    st.add_argument("name", nargs="?", help="the cluster (default: the current one)")
    st.add_argument("--cluster", metavar="NAME", help="the cluster (the same as NAME)")
    st.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    st.set_defaults(func=cmd_status)

    ls = verbs.add_parser("list", help="list the clusters that are up; * marks the current one",
                          description="List the clusters; * marks the one commands use when none is named (--cluster "
                                      f"NAME, else ${state.CLUSTER_ENV}, else the one chosen with `meshctl cluster "
                                      "use`, else the only one up).")
    ls.set_defaults(func=cmd_list)

    use = verbs.add_parser("use", help="make a cluster the current one, used when a command names none",
                           description="Make NAME the current cluster: every command that takes --cluster uses it "
                                       f"when none is given (${state.CLUSTER_ENV} still wins). `cluster up` makes "
                                       "the new cluster current. Needs root (the clusters' state is root's).")
    use.add_argument("name", metavar="NAME", help="a cluster that is up (`meshctl cluster list`)")
    use.set_defaults(func=cmd_use)


def cmd_up(args: argparse.Namespace) -> int:
    lifecycle.require_root("cluster up")
    cluster_spec = spec.load(args.file)
    if args.redirect_mode:
        cluster_spec = spec.with_redirect_mode(cluster_spec, args.redirect_mode)
    cluster_spec = spec.with_observability(cluster_spec, scrape_interval=args.scrape_interval,
                                           prometheus=False if args.no_prometheus else None,
                                           otlp_endpoint=args.otlp_endpoint)
    for warning in cluster_spec.warnings:
        print(f"warning: {warning}")
    cluster = lifecycle.up(cluster_spec, ready_timeout=args.wait, agent_args=args.agent_arg)
    print(f"cluster {cluster.plan.name!r} is up: {len(cluster.plan.nodes)} nodes, {len(cluster.plan.pods)} pods, "
          f"{len(cluster.plan.services)} services")
    if (prom := lifecycle.status(cluster.plan.name).get("prometheus")) is not None:
        print(f"prometheus: {prom['url']} (in network namespace {prom['netns']})")
    state.set_current(cluster.plan.name)
    print(f"current cluster: {cluster.plan.name} (commands use it when they name none)")
    print(f"remove it with: meshctl cluster down {cluster.plan.name}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lifecycle.require_root("cluster down")
    name = _name(args) or state.find_cluster(None)
    was_current = state.current_cluster() == name
    removed = lifecycle.down(name)
    if was_current:
        state.set_current(None)
    if removed:
        print(f"cluster {name!r} removed: {', '.join(removed)}")
    else:
        print(f"cluster {name!r} is not up; nothing to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    name = state.find_cluster(_name(args))
    record = lifecycle.status(name)
    if args.output == "json":
        print(json.dumps(record, indent=2, sort_keys=True))
        return 0
    print(render_status(record))
    return 0


def _name(args: argparse.Namespace) -> str | None:
    if args.name and args.cluster and args.name != args.cluster:
        raise UsageError(f"two clusters named: {args.name!r} and --cluster {args.cluster!r}")
    return str(args.name or args.cluster or "") or None


def cmd_list(args: argparse.Namespace) -> int:
    names = state.known_clusters()
    if not names:
        print(f"No clusters are up (in {state.state_root()}).", file=sys.stderr)
        return 0
    try:
        chosen: str | None = state.find_cluster(None)
    except state.ClusterNotFound:
        chosen = None  # several up and none chosen, or $MESH_CLUSTER names one that is not up
    print(render_list([(n, "up" if lifecycle.is_up(n) else "incomplete") for n in names], chosen))
    return 0


def render_list(clusters: list[tuple[str, str]], current: str | None) -> str:
    return table(["CURRENT", "NAME", "STATUS"], [["*" if n == current else "", n, st] for n, st in clusters])


def cmd_use(args: argparse.Namespace) -> int:
    access.require_root("cluster use")
    state.set_current(state.find_cluster(args.name))
    print(f"current cluster: {args.name}")
    if (env := os.environ.get(state.CLUSTER_ENV)) and env != args.name:
        print(f"note: ${state.CLUSTER_ENV}={env} is set and wins over the current cluster", file=sys.stderr)
    return 0


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _restarts(process: dict[str, Any]) -> str:
    """How often the cluster started a component again, and when last (as kubectl shows RESTARTS)."""
    count = int(process.get("restarts", 0))
    return f"{count} (last {process['lastRestart']})" if count and process.get("lastRestart") else str(count)


def render_status(record: dict[str, Any]) -> str:
    plan = record["plan"]
    out = [f"cluster {record['name']}: {record['phase']} since {record['started']} (from {record['source']})", ""]
    out.append(table(["NODE", "ADDRESS", "POD CIDR", "NETNS"],
                     [[n["name"], n["ip"], n["podCIDR"], n["netns"] if n["netnsPresent"] else "MISSING"]
                      for n in plan["nodes"]]))
    out.append("")
    out.append(table(["NAMESPACE", "POD", "NODE", "IP", "STATUS"],
                     [[p["namespace"], p["name"], p["node"], p["ip"], "Running" if p["running"] else "Exited"]
                      for p in plan["pods"]]))
    out.append("")
    rows = []
    for s in plan["services"]:
        for port in s["ports"]:
            rows.append([s["namespace"], s["name"], s["clusterIP"], str(port["port"]),
                         ",".join(port["endpoints"]) or "<none>"])
    out.append(table(["NAMESPACE", "SERVICE", "CLUSTER-IP", "PORT", "ENDPOINTS"], rows))
    if (prom := record.get("prometheus")) is not None:
        out.append("")
        out.append(f"prometheus: {prom['url']} in network namespace {prom['netns']} "
                   f"({'Running' if prom['running'] else 'Exited'}); e.g. ip netns exec {prom['netns']} "
                   f"curl -s '{prom['url']}/api/v1/query?query=up'")
    others = [p for p in record.get("processes", []) if not p["name"].startswith("pod ")]
    if others:
        out.append("")
        out.append(table(["COMPONENT", "PID", "NETNS", "STATUS", "RESTARTS"],
                         [[p["name"], str(p["pid"]), p["netns"], "Running" if p["running"] else "Exited",
                           _restarts(p)] for p in others]))
    return "\n".join(out)
