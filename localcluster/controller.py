"""The local cluster's controller process: keeps the waypoint pods in line with the Gateways.

    python -m localcluster.controller --cluster NAME [--interval SECONDS] [--cert-ttl SECONDS]

It runs in the host's namespace (it creates network namespaces), started by `cluster up` and stopped by
`cluster down`.  Every interval it reads the Gateways from the control plane and starts or removes
waypoint pods; a failed step is logged and tried again on the next round.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from localcluster import plan, spec, state
from localcluster.spec import Observability
from localcluster.waypoints import WaypointController
from mesh.errors import MeshError

log = logging.getLogger("localcluster.controller")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controller", description="The local cluster's waypoint controller.")
    p.add_argument("--cluster", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--cert-ttl", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    record = state.read_record(args.cluster)
    # The name is the cluster's, not the file's: a cluster may be started under another name.
    cluster_plan = plan.make_plan(dataclasses.replace(spec.load(record["source"]), name=args.cluster))
    controller = WaypointController(args.cluster, cluster_plan, state.cluster_dir(args.cluster), args.cert_ttl,
                                    proxy_args=Observability.from_record(record.get("observability")).proxy_args())
    for proc in record.get("processes", []):  # adopt the waypoints an earlier run started
        if proc["name"].startswith("waypoint "):
            key = proc["name"].split(" ", 1)[1]
            pod = next((p for p in record["plan"]["pods"] if p.get("waypoint") and
                        f"{p['namespace']}/{p['name']}" == key), None)
            if pod is not None:
                controller.running[key] = {"pod": {k: v for k, v in pod.items() if k != "waypoint"}, "process": proc}
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
        stop.wait(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
