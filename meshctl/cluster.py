"""`meshctl cluster up|down|status`: the local multi-node cluster on network namespaces."""

from __future__ import annotations

import argparse
import json
from typing import Any

from localcluster import lifecycle, spec, state
from mesh import defaults

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
    down.add_argument("name", nargs="?", help="the cluster (default: the only one up)")
    down.set_defaults(func=cmd_down)

    st = verbs.add_parser("status", help="show nodes, pods and services of a cluster",
                          description="Show a cluster's nodes, pods (with liveness) and services.")
    st.add_argument("name", nargs="?", help="the cluster (default: the only one up)")
    st.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    st.set_defaults(func=cmd_status)

    ls = verbs.add_parser("list", help="list the clusters that are up")
    ls.set_defaults(func=cmd_list)


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
    print(f"remove it with: meshctl cluster down {cluster.plan.name}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lifecycle.require_root("cluster down")
    name = args.name or state.find_cluster(None)
    removed = lifecycle.down(name)
    if removed:
        print(f"cluster {name!r} removed: {', '.join(removed)}")
    else:
        print(f"cluster {name!r} is not up; nothing to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    name = state.find_cluster(args.name)
    record = lifecycle.status(name)
    if args.output == "json":
        print(json.dumps(record, indent=2, sort_keys=True))
        return 0
    print(render_status(record))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in state.known_clusters():
        print(f"{name}\t{'up' if lifecycle.is_up(name) else 'incomplete'}")
    return 0


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


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
        out.append(table(["COMPONENT", "PID", "NETNS", "STATUS"],
                         [[p["name"], str(p["pid"]), p["netns"], "Running" if p["running"] else "Exited"]
                          for p in others]))
    return "\n".join(out)
