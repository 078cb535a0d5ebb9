"""`meshctl dashboard`: the mesh's service graph, workloads, traces and health in a web page.

Serves a page and its JSON API from the host, http://127.0.0.1:20001/ by default (Kiali's port), for one
local cluster: the service graph per namespace (from the cluster's Prometheus: request rate, error rate,
p99 and a lock on mutual-TLS edges, waypoints where traffic passes them), each workload (pods, node,
identity, the policies that select it, the routes that reach it, charts), traces as waterfalls of spans
across proxies, and the mesh's own health (control plane, agents, waypoints with their config versions,
certificate expiry).

Traces: when the cluster's proxies export to the underlay's gateway (`meshctl cluster up --otlp-endpoint
http://172.30.0.1:4318/v1/traces`), the dashboard is that collector: it receives OTLP/HTTP there, inside the
underlay network namespace.  With a Jaeger elsewhere, give --jaeger-url.

The API: GET /api/graph?namespace=NS, /api/traces?service=NAME, /api/trace?id=ID, /api/workload?namespace=NS&name=W,
/api/health, /api/namespaces.  An unreachable Prometheus, control plane or collector is a banner on the
page and a warning in the log.

    meshctl dashboard                  serve until interrupted (Ctrl-C)
    meshctl dashboard --detach         run in the background as a process of the cluster (`cluster down`
                                       stops it; its log is <cluster dir>/logs/dashboard.log) and print its address
    meshctl dashboard --open           also open it in a browser
    meshctl dashboard --stop           stop the one running in the background
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import webbrowser
from pathlib import Path
from typing import Any

from localcluster import processes, state
from localcluster.components import component_env
from localcluster.processes import ProcessRecord
from mesh.files import write_atomic
from meshctl.dashboard.app import DEFAULT_ADDRESS, DEFAULT_PORT, Dashboard, Options
from meshctl.dashboard.errors import DashboardError

STATE_FILE = "dashboard.json"
PROCESS = "dashboard"
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def _state_path(cluster: str) -> Path:
    return state.cluster_dir(cluster) / STATE_FILE


def running(cluster: str) -> dict[str, Any] | None:
    """The dashboard running in the background for `cluster` (its state file, if its process lives)."""
    try:
        data: dict[str, Any] = json.loads(_state_path(cluster).read_text())
        rec = ProcessRecord(PROCESS, int(data["pid"]), int(data["start_time"]), "", "")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if processes.is_running(rec) else None


def _forwarded(args: argparse.Namespace, cluster: str) -> list[str]:
    argv = ["--cluster", cluster, "--address", args.address, "--port", str(args.port)]
    for flag, value in (("--prometheus", args.prometheus), ("--otlp-listen", args.otlp_listen),
                        ("--jaeger-url", args.jaeger_url), ("--refresh", args.refresh)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def detach(args: argparse.Namespace, cluster: str) -> dict[str, Any]:
    """Start the dashboard as a background process of the cluster; what it wrote in its state file."""
    if (found := running(cluster)) is not None:
        print(f"the dashboard of cluster {cluster!r} is already running (pid {found['pid']})")
        return found
    env = component_env({"PYTHONPATH": str(ROOT)})
    if os.environ.get("MESH_STATE_DIR"):
        env["MESH_STATE_DIR"] = os.environ["MESH_STATE_DIR"]
    log = state.cluster_dir(cluster) / "logs" / "dashboard.log"
    rec = processes.spawn(cluster, PROCESS, "", [sys.executable, "-m", "meshctl.main", "dashboard",
                                                 *_forwarded(args, cluster)], env, log, cwd=str(ROOT))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = running(cluster)
        if found is not None and found.get("pid") == rec.pid:
            return found
        if not processes.is_running(rec):
            raise DashboardError(f"the dashboard exited while starting; its log ({log}) ends with:\n"
                                 f"{processes.tail(log)}")
        time.sleep(0.1)
    processes.stop([rec.pid])
    raise DashboardError(f"the dashboard did not start within {START_TIMEOUT:.0f}s; see {log}")


def stop(cluster: str) -> bool:
    found = running(cluster)
    if found is None:
        return False
    processes.stop([int(found["pid"])])
    with contextlib.suppress(OSError):
        _state_path(cluster).unlink()
    return True


def serve(args: argparse.Namespace, cluster: str) -> int:
    logging.getLogger("meshctl.dashboard").setLevel(logging.INFO)
    dashboard = Dashboard(Options(cluster, args.address, args.port, args.prometheus, args.otlp_listen,
                                  args.jaeger_url, args.refresh))
    url = dashboard.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    path = _state_path(cluster)
    write_atomic(path, json.dumps({"pid": os.getpid(), "start_time": processes.start_time(os.getpid()) or 0,
                                   "url": url, "receiving": dashboard.receiving or None}).encode())
    print(f"dashboard of cluster {cluster!r}: {url}", flush=True)
    if dashboard.receiving:
        print(f"receiving spans (OTLP/HTTP) on {dashboard.receiving}", flush=True)
    if args.open:
        _open(url)
    try:
        while not done.wait(1.0):
            pass
    finally:
        dashboard.stop()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
    return 0


def _open(url: str) -> None:
    try:
        opened = webbrowser.open(url)
    except webbrowser.Error:
        opened = False
    if not opened:
        print(f"no browser could be opened here: open {url} yourself", flush=True)


def run(args: argparse.Namespace) -> int:
    cluster = state.find_cluster(args.cluster)
    if args.stop:
        print(f"dashboard of cluster {cluster!r} stopped" if stop(cluster) else
              f"no dashboard of cluster {cluster!r} is running in the background")
        return 0
    if not args.detach:
        return serve(args, cluster)
    found = detach(args, cluster)
    print(f"dashboard of cluster {cluster!r}: {found['url']} (pid {found['pid']}; stop it with meshctl dashboard "
          f"--stop, or with the cluster)")
    if found.get("receiving"):
        print(f"receiving spans (OTLP/HTTP) on {found['receiving']}")
    if args.open:
        _open(str(found["url"]))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("dashboard", help="serve a web page with the service graph, workloads, traces and "
                                                "the mesh's health (port 20001)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", help="cluster name (default: the only cluster up)")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="address to serve the page on (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve the page on (default %(default)s; "
                                                                  "0 picks a free one)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true",
                      help="run in the background as a process of the cluster and print the address")
    mode.add_argument("--stop", action="store_true", help="stop the dashboard running in the background")
    p.add_argument("--prometheus", metavar="URL",
                   help="read metrics from this Prometheus (default: the cluster's own, in its underlay namespace)")
    p.add_argument("--otlp-listen", metavar="HOST:PORT",
                   help="receive spans (OTLP/HTTP) here, or 'none' (default: the cluster's --otlp-endpoint when it is "
                        "on the underlay's gateway, else the gateway's port 4318)")
    p.add_argument("--jaeger-url", metavar="URL",
                   help="read traces from this Jaeger query service instead of receiving them")
    p.add_argument("--refresh", type=float, metavar="SECONDS",
                   help="how often the page refreshes (default: the cluster's scrape interval, at least 2 s)")
    p.set_defaults(func=run)
