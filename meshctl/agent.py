"""`meshctl agent workloads|services|certs|policies|connections|redirect|log-level NODE`: what a node agent knows, read from its admin endpoint.

The agent serves its admin endpoint on 127.0.0.1:15000 of its node, which only that node can reach.
In the local cluster the agent runs in the node's network namespace, so meshctl opens its connection
from inside that namespace (this needs root, as `meshctl cluster up` does).  `--admin-address
HOST:PORT` reads from another address instead, without entering any namespace.

    workloads   the pods on the node (all known workloads with --all): address, tunnel, waypoint,
                identity, capture mode and enrollment state
    certs       the certificates the agent holds for its pods: state, expiry, next renewal
    policies    the authorization policies the agent knows and the local pods each applies to
    restart     replace the agent without refusing a connection: the new one starts beside it, and
                the old one drains once the new one is ready (optionally in another capture mode)
    redirect    how each enrolled pod is captured: the eBPF programs (links, map sizes) or iptables rules
    services    the services the agent knows: addresses, ports, waypoint, endpoints
    connections the connections it has proxied, by source and destination (open, opened, closed, bytes)
    log-level   show or change the agent's log levels while it runs (its admin `/logging`)
"""

from __future__ import annotations

import argparse
import datetime
import json
import urllib.parse
from typing import Any

from localcluster import lifecycle, state
from localcluster.plan import cluster_prefix
from mesh import defaults, logs, netns
from mesh.errors import MeshError, UsageError
from mesh.serve import client
from mesh.serve.errors import HttpClientError
from meshctl import access, agentviews

ADMIN_HOST = "127.0.0.1"
ADMIN_PORT = defaults.ADMIN_PORT
METRICS_PORT = defaults.METRICS_PORT
TIMEOUT = 5.0

PATHS = {"workloads": "/workloads", "certs": "/certs", "policies": "/policies", "redirect": "/redirect",
         "services": "/config_dump"}


class AgentCliError(MeshError):
    pass



# --- reaching the agent ---------------------------------------------------------------------------------


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT`."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--admin-address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:15000")
    return host, int(port)


def node_netns(cluster: str, node: str) -> str:
    """The network namespace of `node` in the local cluster `cluster`."""
    record = state.read_record(cluster)
    nodes = {n["name"]: n.get("netns") for n in record.get("plan", {}).get("nodes", [])}
    if node not in nodes:
        have = ", ".join(sorted(nodes)) or "none"
        raise AgentCliError(f"node {node!r} is not in cluster {cluster!r} (nodes: {have})")
    return nodes[node] or f"{cluster_prefix(cluster)}node.{node}"


def fetch(path: str, node: str, *, address: str | None = None, cluster: str | None = None,
          method: str = "GET") -> dict[str, Any]:
    """`method` (GET) `path` on the admin endpoint of the agent on `node` and return its JSON."""
    if address:
        host, port = parse_address(address)
        return call_admin(method, path, host=host, port=port, ns=None, where=f"node agent at {host}:{port}")
    access.require_root("agent")
    ns = node_netns(state.find_cluster(cluster), node)
    return call_admin(method, path, host=ADMIN_HOST, port=ADMIN_PORT, ns=ns, where=f"node agent on {node}")


def call_admin(method: str, path: str, *, host: str, port: int, ns: str | None, where: str) -> dict[str, Any]:
    """`method path` on an admin endpoint (a node agent's or a waypoint's) at host:port, from inside
    network namespace `ns` when given; its JSON answer.  `where` names the process in errors."""
    reply = call(method, path, host=host, port=port, ns=ns, where=where)
    try:
        data = reply.json()
    except ValueError:
        raise AgentCliError(f"{where} sent something that is not JSON for {path}") from None
    if not isinstance(data, dict):
        raise AgentCliError(f"{where} sent unexpected JSON for {path}")
    return data


def call(method: str, path: str, *, host: str, port: int, ns: str | None, where: str) -> client.Reply:
    """As `call_admin`, the answer as it came (a 200 one)."""
    try:
        reply = client.request(client.Endpoint.tcp(host, port, netns=ns), method, path,
                               b"" if method == "POST" else None, timeout=TIMEOUT)
    except netns.NetnsError as exc:
        raise AgentCliError(f"cannot enter the network namespace of the {where}: {exc}") from None
    except HttpClientError:
        raise AgentCliError(f"{where} is not answering on {host}:{port}: is it running? "
                            "(`meshctl cluster status`)") from None
    if reply.status != 200:
        raise AgentCliError(f"{where} answered {reply.status} for {method} {path}: {reply.text.strip()}")
    return reply


def fetch_metrics(node: str, *, address: str | None = None, cluster: str | None = None) -> str:
    """The Prometheus text of the agent on `node` (its metrics port, on the node's loopback)."""
    if address:
        host, port = parse_address(address)
        return call("GET", "/metrics", host=host, port=port, ns=None, where=f"node agent at {host}:{port}").text
    access.require_root("agent")
    ns = node_netns(state.find_cluster(cluster), node)
    return call("GET", "/metrics", host=ADMIN_HOST, port=METRICS_PORT, ns=ns, where=f"node agent on {node}").text


# --- rendering (pure) -----------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _identity(w: dict[str, Any]) -> str:
    if not w.get("service_account"):
        return "-"
    td = w.get("trust_domain") or defaults.TRUST_DOMAIN
    return f"spiffe://{td}/ns/{w.get('namespace', '')}/sa/{w['service_account']}"


def _waypoint(w: dict[str, Any]) -> str:
    gw = w.get("waypoint") or {}
    if not gw:
        return "-"
    if gw.get("name"):
        return f"{gw.get('namespace', '')}/{gw['name']}"
    host = (gw.get("hostname") or {}).get("hostname") or (gw.get("address") or {}).get("address")
    return host or "yes"


def _status(w: dict[str, Any]) -> str:
    """The workload's health as the control plane reports it (HEALTHY unless it says otherwise)."""
    return str(w.get("status") or "HEALTHY").upper()


def _capture(w: dict[str, Any]) -> str:
    """How this agent captures the pod: its enrollment with the capture mode (`enrolled (ebpf)`); "-" for
    a workload it does not capture (another node's)."""
    enrollment = w.get("enrollment")
    if not enrollment:
        return "-"
    return f"{enrollment} ({w['capture']})" if w.get("capture") else str(enrollment)


def render_workloads(data: dict[str, Any], show_all: bool = False) -> str:
    node = data.get("node") or "?"
    items = [w for w in data.get("workloads", []) if show_all or w.get("local")]
    rows = [
        [
            w.get("namespace", ""),
            w.get("name", ""),
            ",".join(w.get("addresses", [])) or "-",
            w.get("node", "") or "-",
            "HBONE" if w.get("tunnel_protocol") == "HBONE" else "TCP",
            _waypoint(w),
            _identity(w),
            _status(w),
            _capture(w),
        ]
        for w in items
    ]
    what = "workloads known to" if show_all else "workloads on"
    head = f"{len(rows)} {what} the agent of {node}"
    if not rows:
        return head + ("" if show_all else " (use --all to list every workload it knows)")
    headers = ["NAMESPACE", "NAME", "ADDRESS", "NODE", "PROTOCOL", "WAYPOINT", "IDENTITY", "STATUS", "CAPTURE"]
    return head + "\n" + table(headers, rows)


def _when(value: object, now: datetime.datetime) -> str:
    """An ISO time as `2024-05-02 10:00:00Z (in 23h59m)`."""
    if not value:
        return "-"
    try:
        t = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    t = t.astimezone(datetime.UTC)
    return f"{t:%Y-%m-%d %H:%M:%S}Z ({_delta((t - now).total_seconds())})"


def _delta(seconds: float) -> str:
    past, s = seconds < 0, int(abs(seconds))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    text = f"{d}d{h}h" if d else f"{h}h{m}m" if h else f"{m}m{s % 60}s"
    return f"{text} ago" if past else f"in {text}"


def render_certs(data: dict[str, Any], now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    certs = data.get("certificates", [])
    head = f"{len(certs)} certificate(s) held by the agent of {data.get('node') or '?'}"
    if not certs:
        return head
    rows = []
    problems = []
    for c in certs:
        nxt = c.get("next_attempt_in")
        rows.append([
            str(c.get("identity", "")),
            str(c.get("state", "")).upper() or "-",
            str(c.get("serial") or "-"),
            _when(c.get("not_before"), now) if c.get("not_before") else "-",
            _when(c.get("not_after"), now),
            _delta(float(nxt)) if isinstance(nxt, int | float) else "-",
        ])
        if c.get("last_error"):
            problems.append(f"  {c.get('identity')}: {c['last_error']} ({c.get('failures', 0)} failure(s))")
    out = head + "\n" + table(["IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "NEXT RENEWAL"], rows)
    if problems:
        out += "\n\nLast errors:\n" + "\n".join(problems)
    return out


def chain_of(data: dict[str, Any], identity: str) -> str:
    """The PEM chain of `identity` (or `NS/SA`) among the agent's certificates."""
    certs = data.get("certificates", [])
    if not identity.startswith("spiffe://"):
        ns, sep, sa = identity.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise UsageError(f"--chain {identity!r}: give spiffe://TRUST-DOMAIN/ns/NS/sa/SA or NS/SA")
        identity = next((str(c.get("identity")) for c in certs
                         if str(c.get("identity", "")).endswith(f"/ns/{ns}/sa/{sa}")), identity)
    for c in certs:
        if c.get("identity") == identity:
            if not c.get("chain"):
                raise AgentCliError(f"the agent of {data.get('node') or '?'} holds no certificate for {identity} yet "
                                    f"(state {c.get('state', '?')}" + (f": {c['last_error']}" if c.get("last_error")
                                                                       else "") + ")")
            return str(c["chain"])
    have = ", ".join(str(c.get("identity")) for c in certs) or "none"
    raise AgentCliError(f"the agent of {data.get('node') or '?'} holds no certificate for {identity} (it holds: {have})")


def _count_rules(p: dict[str, Any]) -> str:
    rules = p.get("rules", [])
    return "none" if not rules else str(len(rules))


def _scope(p: dict[str, Any]) -> str:
    scope = p.get("scope", "GLOBAL")
    if scope == "WORKLOAD_SELECTOR":
        sel = ",".join(f"{k}={v}" for k, v in sorted((p.get("selector") or {}).items()))
        return f"selector {sel}" if sel else "selector"
    return {"GLOBAL": "mesh", "NAMESPACE": "namespace"}.get(scope, scope.lower())


def render_policies(data: dict[str, Any]) -> str:
    pols = data.get("policies", [])
    head = f"{len(pols)} authorization policies known to the agent of {data.get('node') or '?'}"
    if not pols:
        return head
    rows = [
        [
            p.get("namespace", ""),
            p.get("name", ""),
            p.get("action", "ALLOW") + (" (dry-run)" if p.get("dry_run") else ""),
            _scope(p),
            _count_rules(p),
            ", ".join(p.get("applies_to", [])) or "-",
        ]
        for p in pols
    ]
    return head + "\n" + table(["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES", "APPLIES TO (this node)"], rows)


# --- the verb -------------------------------------------------------------------------------------------


def render_redirect(data: dict[str, Any]) -> str:
    """The capture of each enrolled pod: mode, whether it is exactly the agent's, and what is in place
    (eBPF programs with their links and map sizes, or the iptables rules)."""
    node, mode = data.get("node") or "?", data.get("mode") or "?"
    pods = data.get("pods", [])
    lines = [f"{len(pods)} pods captured by the agent of {node} ({mode})"]
    for pod in pods:
        if "error" in pod:
            lines.append(f"{pod['pod']}: cannot read its capture: {pod['error']}")
            continue
        state = "exact" if pod.get("exact") else "partial" if pod.get("present") else "none"
        lines.append(f"{pod['pod']}: {state}")
        lines += [f"    {d}" for d in pod.get("detail", [])]
    return "\n".join(lines)


def levels_path(spec: str | None, reset: bool) -> tuple[str, str]:
    """The admin request that shows (no spec), changes (`spec`, checked here first) or resets the levels."""
    if reset and spec:
        raise UsageError("give a level spec or --reset, not both")
    if reset:
        return "POST", "/logging?reset"
    if not spec:
        return "GET", "/logging"
    try:
        logs.parse_levels(spec)
    except logs.LogLevelError as exc:
        raise UsageError(f"log level {exc}") from None
    return "POST", "/logging?" + urllib.parse.urlencode({"level": spec})


def render_levels(data: dict[str, Any], where: str) -> str:
    levels = dict(data.get("levels") or {})
    default = levels.pop("", "?")
    own = ", ".join(f"{name}={level}" for name, level in sorted(levels.items()))
    return f"log level of the {where}: {default}" + (f" ({own})" if own else "")


def run_log_level(args: argparse.Namespace) -> int:
    method, path = levels_path(args.spec, args.reset)
    print(render_levels(fetch(path, args.node, address=args.admin_address, cluster=args.cluster, method=method),
                        f"node agent on {args.node}"))
    return 0


def run_restart(args: argparse.Namespace) -> int:
    name = state.find_cluster(args.cluster)
    rec = lifecycle.restart_agent(name, args.node, args.redirect_mode)
    print(f"node agent of {args.node} replaced (pid {rec.pid}" +
          (f", capture mode {args.redirect_mode}" if args.redirect_mode else "") +
          "): the old one drained its connections and exited")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.what == "connections":  # counted by the agent's metrics, on the metrics port
        rows = agentviews.connection_rows(fetch_metrics(args.node, address=args.metrics_address,
                                                        cluster=args.cluster))
        print(json.dumps(rows, indent=2) if args.output == "json" else agentviews.render_connections(args.node, rows))
        return 0
    data = fetch(PATHS[args.what], args.node, address=args.admin_address, cluster=args.cluster)
    if args.what == "services":
        data = {"node": data.get("node"), "services": data.get("services", [])}
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.what == "services":
        print(agentviews.render_services(data))
    elif args.what == "workloads":
        print(render_workloads(data, show_all=args.all))
    elif args.what == "certs" and args.chain:
        print(chain_of(data, args.chain), end="")
    elif args.what == "certs":
        print(render_certs(data))
    elif args.what == "redirect":
        print(render_redirect(data))
    else:
        print(render_policies(data))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "agent",
        help="show what a node agent knows: its workloads, services, certificates, policies, connections",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    helps = {
        "workloads": "the workloads on the node (with --all: every workload the agent knows)",
        "certs": "the certificates the agent holds for its pods",
        "policies": "the authorization policies the agent knows and where they apply",
        "redirect": "how the agent captures each of its pods: the eBPF programs attached (links, map sizes) "
                    "or the iptables rules",
        "services": "the services the agent knows: addresses, ports, waypoint, healthy endpoints",
        "connections": "the connections the agent has proxied, by source and destination: open now, opened, "
                       "closed, bytes (from its metrics)",
    }
    for what, text in helps.items():
        s = sub.add_parser(what, help=text, description=f"Show {text}.")
        s.add_argument("node", metavar="NODE", help="the node whose agent to ask, e.g. node-1")
        s.add_argument("--cluster", help="cluster name (default: the only cluster up)")
        if what == "connections":
            s.add_argument("--metrics-address", metavar="HOST:PORT",
                           help="read the agent's metrics endpoint at this address (no namespace is entered)")
        else:
            s.add_argument("--admin-address", metavar="HOST:PORT",
                           help="read the agent's admin endpoint at this address (no namespace is entered)")
        s.add_argument("-o", "--output", choices=["table", "json"], default="table")
        if what == "workloads":
            s.add_argument("-A", "--all", action="store_true", help="every workload the agent knows")
        if what == "certs":
            s.add_argument("--chain", metavar="IDENTITY",
                           help="print the certificate chain (PEM, leaf first) the agent holds for IDENTITY "
                                "(spiffe://TD/ns/NS/sa/SA, or NS/SA), e.g. for `meshctl ca check -`")
        s.set_defaults(func=run, what=what)
    lv = sub.add_parser("log-level", help="show or change the agent's log levels while it runs",
                        description="Show the log levels of the node's agent, or change them without a restart "
                                    "(its admin endpoint's /logging, as ztunnel's): SPEC is LEVEL or "
                                    "LOGGER=LEVEL items, comma-separated; levels: " + ", ".join(logs.LEVELS) +
                                    ". --reset goes back to the level it started with. Needs root.",
                        epilog="examples:\n  meshctl agent log-level node-1 debug\n"
                               "  meshctl agent log-level node-1 info,nodeagent.proxy=debug\n"
                               "  meshctl agent log-level node-1 --reset",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lv.add_argument("node", metavar="NODE", help="the node whose agent to ask, e.g. node-1")
    lv.add_argument("spec", nargs="?", metavar="SPEC", help="the levels to set (default: show them)")
    lv.add_argument("--reset", action="store_true", help="back to the level the agent started with")
    lv.add_argument("--cluster", help="cluster name (default: the current one)")
    lv.add_argument("--admin-address", metavar="HOST:PORT",
                    help="the agent's admin endpoint at this address (no namespace is entered)")
    lv.set_defaults(func=run_log_level)
    r = sub.add_parser("restart", help="replace a node's agent without refusing connections (optionally in "
                                       "another capture mode)",
                       description="Replace the node's agent as the DaemonSet's rolling update does (maxSurge "
                                   "1): a new agent starts beside the old one, shares its ports in the pods and "
                                   "on the node, adopts the pods' capture and takes every new connection; once "
                                   "its readiness probe passes, the old one gets SIGTERM, lets its open "
                                   "connections finish (its --drain-seconds, 5 by default) and exits. No "
                                   "connection is refused meanwhile. With --redirect-mode the node switches "
                                   "capture mode; take the pods out of the mesh first (label their namespace "
                                   "istio.io/dataplane-mode-) for a clean switch. Needs root.")
    r.add_argument("node", metavar="NODE", help="the node whose agent to restart, e.g. node-1")
    r.add_argument("--cluster", help="cluster name (default: the only cluster up)")
    r.add_argument("--redirect-mode", choices=defaults.REDIRECT_MODES, metavar="MODE",
                   help="capture mode of the new agent: iptables or ebpf (default: the node's current mode)")
    r.set_defaults(func=run_restart)
