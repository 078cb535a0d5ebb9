"""The local cluster's controller process: keeps the waypoint pods in line with the Gateways, and the
node agents running.

    python -m localcluster.controller --cluster NAME [--interval SECONDS] [--cert-ttl SECONDS]
        [--restart-backoff SECONDS] [--restart-backoff-max SECONDS]

It runs in the host's namespace (it creates network namespaces), started by `cluster up` and stopped by
`cluster down`.  Every interval it reads the Gateways from the control plane and starts or removes
waypoint pods and ingress gateway pods (with their host ports: `localcluster.ingress`), and does the
kubelet's part for projected volumes (`localcluster.projected`): the node agents' and waypoints' tokens renewed before they expire (or when their key is rotated out), the
waypoints' copy of the trust bundle refreshed; and the DaemonSet's part: a node agent that exited (or was
killed) is started again, with backoff (`localcluster.supervision`).  A failed step is logged and tried
again on the next round.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from localcluster import components, plan, spec, state
from localcluster.ingress import GatewayController
from localcluster.projected import TokenFile, TokenRefresher
from localcluster.spec import Observability
from localcluster.supervision import AgentSupervisor, Backoff
from mesh import defaults, logs
from mesh.api.client import ApiClient
from mesh.errors import MeshError

log = logging.getLogger("localcluster.controller")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controller", description="The local cluster's waypoint controller.")
    p.add_argument("--cluster", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--cert-ttl", type=int, default=0)
    p.add_argument("--restart-backoff", type=float, default=Backoff.initial, metavar="SECONDS",
                   help="wait before restarting a node agent that exited, doubled for each restart in a row "
                        "(default %(default)s)")
    p.add_argument("--restart-backoff-max", type=float, default=Backoff.maximum, metavar="SECONDS",
                   help="the longest wait between restarts (default %(default)s)")
    args = p.parse_args(argv)
    try:
        backoff = Backoff(args.restart_backoff, args.restart_backoff_max)
    except ValueError as exc:
        p.error(str(exc))
    logs.configure("info")
    record = state.read_record(args.cluster)
    # The name is the cluster's, not the file's: a cluster may be started under another name.
    cluster_plan = plan.make_plan(dataclasses.replace(spec.load(record["source"]), name=args.cluster))
    home = state.cluster_dir(args.cluster)
    api = ApiClient(home / components.CONTROLPLANE_SUBDIR / defaults.API_SOCKET, timeout=10)
    # The kubelet's part: the node agents' tokens (and the waypoints', added as they start) kept fresh.
    tokens = TokenRefresher(api, [TokenFile(components.node_token(home, n.name), node=n.name) for n in cluster_plan.nodes])
    controller = GatewayController(args.cluster, cluster_plan, home, args.cert_ttl,
                                    proxy_args=Observability.from_record(record.get("observability")).proxy_args(),
                                    tokens=tokens)
    for proc in record.get("processes", []):  # adopt the waypoints an earlier run started
        if proc["name"].startswith("waypoint "):
            key = proc["name"].split(" ", 1)[1]
            pod = next((p for p in record["plan"]["pods"] if p.get("waypoint") and
                        f"{p['namespace']}/{p['name']}" == key), None)
            if pod is not None:
                controller.adopt(key, {k: v for k, v in pod.items() if k != "waypoint"}, proc)
    supervisor = AgentSupervisor(args.cluster, backoff)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info('{"event": "controller started", "cluster": "%s"}', args.cluster)
    while not stop.is_set():
        try:
            controller.sync()
        except MeshError as exc:
            log.warning("sync failed: %s (retrying)", exc)
        except Exception:
            log.exception("sync failed (retrying)")
        try:
            supervisor.check()
        except Exception:
            log.exception("supervising the node agents failed (retrying)")
        try:
            tokens.refresh()
            controller.project()
        except Exception:  # each failure is logged; the next round tries again
            log.exception("refreshing the projected files failed (retrying)")
        stop.wait(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
