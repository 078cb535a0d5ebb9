"""The waypoint process: one per waypoint Gateway, in its own pod, taking a namespace's L7 traffic.

    python -m waypoint.main --name NAME --namespace NS --node NODE --control-plane HOST:15012 \\
        --root-cert FILE --token-file FILE [--trust-domain cluster.local] [--cert-ttl SECONDS] \\
        [--listen 0.0.0.0:15008] [--metrics-listen 0.0.0.0:15020] [--ready-listen 0.0.0.0:15021] \\
        [--admin-listen 127.0.0.1:15000] [--allow-http-jwks] [--hbone-max-connections N]
        [--hbone-max-handshakes N] [--hbone-max-streams N] [--listener NAME=HTTP:PORT ...] [--workers N] [--engine uvloop|trio]

The token file holds a workload token for the waypoint's own identity
(`spiffe://<trust domain>/ns/NS/sa/NAME`); with it the waypoint asks the CA for its certificate and
subscribes to discovery.  With `--listener` it runs in gateway mode (`waypoint.gateway`): an ingress
Gateway's pod, serving the Gateway's listeners and routing by host instead of taking HBONE.  With
`--workers N` (default: the usable CPUs, at most 2) N processes share its ports (`waypoint.workers`).  Access log: one JSON line per request on stdout.  SIGTERM or SIGINT drains
(GOAWAY to clients, tunnels in flight finish within --drain-seconds) and exits 0.

This module only reads the command line; the waypoint is assembled in `waypoint.app`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mesh import runtime
from waypoint import app, gateway, workers
from waypoint.options import ENGINES, MAX_WORKERS, Options, default_workers


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="waypoint", description="A waypoint: the L7 proxy of a namespace.")
    p.add_argument("--name", required=True, help="the waypoint Gateway's name")
    p.add_argument("--namespace", required=True, help="the waypoint Gateway's namespace")
    p.add_argument("--node", required=True, help="the node this waypoint runs on")
    p.add_argument("--service-account", default=Options.service_account,
                   help="the waypoint's service account (default: --name)")
    p.add_argument("--listen", default=Options.listen, metavar="HOST:PORT", help="HBONE inbound")
    p.add_argument("--drain-seconds", type=float, default=Options.drain_seconds, metavar="SECONDS",
                   help="how long tunnels in flight may take to finish after SIGTERM")
    p.add_argument("--allow-http-jwks", action="store_true",
                   default=os.environ.get("WAYPOINT_ALLOW_HTTP_JWKS", "").lower() in ("1", "true", "yes"),
                   help="allow a RequestAuthentication jwksUri over plain http (refused by default: anyone on "
                        "the path could hand in keys); also WAYPOINT_ALLOW_HTTP_JWKS=1")
    p.add_argument("--hbone-max-connections", type=int, default=Options.hbone_max_connections, metavar="N",
                   help="HBONE connections the waypoint's listener keeps open at once; more are closed as soon as "
                        "accepted (default %(default)s)")
    p.add_argument("--hbone-max-handshakes", type=int, default=Options.hbone_max_handshakes, metavar="N",
                   help="TLS handshakes the listener runs at once; more wait their turn within the handshake "
                        "timeout (default %(default)s)")
    p.add_argument("--hbone-max-streams", type=int, default=Options.hbone_max_streams, metavar="N",
                   help="tunnels (HTTP/2 streams) one client connection may have open at once, announced to it "
                        "as SETTINGS_MAX_CONCURRENT_STREAMS (default %(default)s)")
    p.add_argument("--listener", action="append", default=[], metavar="NAME=HTTP:PORT|NAME=HTTPS:PORT:CERT:KEY",
                   help="gateway mode (an ingress Gateway's pod): serve this listener of the Gateway (repeat for each) "
                        "instead of HBONE inbound; an HTTPS listener terminates TLS with the PEM chain and key given")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes serving the data path, sharing its ports with SO_REUSEPORT (default: the CPUs "
                        f"this process may use, at most 2; 1 to {MAX_WORKERS})")
    p.add_argument("--engine", choices=ENGINES, default=Options.engine,
                   help="what moves the data path's bytes: uvloop (the engine: HBONE and HTTP/1.1 on asyncio "
                        "Protocols, the rest handed to trio) or trio (all of it on trio); gateway mode always "
                        "runs on trio (default %(default)s)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)  # set by the primary
    p.add_argument("--worker-channel", type=int, default=-1, help=argparse.SUPPRESS)
    runtime.add_flags(p, token_help="a workload token for the waypoint's identity, as the control plane issued it")
    args = p.parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers
    if not 1 <= workers <= MAX_WORKERS:
        p.error(f"--workers {workers}: give a number of processes from 1 to {MAX_WORKERS}")
    if args.worker_index and args.worker_channel < 0:
        p.error("--worker-index is set by the waypoint on the workers it starts, with their channel")
    try:
        listeners = tuple(gateway.parse_listener(text) for text in args.listener)
        gateway.check_listeners(list(listeners))
        for spec in listeners:  # certificate files that cannot be used are a usage error, not a traceback
            if spec.protocol == "HTTPS":
                gateway.server_context(spec)
    except ValueError as exc:
        p.error(str(exc))
    shared = runtime.flag_values(p, args, listen=("listen",))
    try:
        return Options(name=args.name, namespace=args.namespace, node=args.node, service_account=args.service_account,
                       listen=args.listen, drain_seconds=args.drain_seconds, allow_http_jwks=args.allow_http_jwks,
                       hbone_max_connections=args.hbone_max_connections, hbone_max_handshakes=args.hbone_max_handshakes,
                       hbone_max_streams=args.hbone_max_streams, listeners=listeners, workers=workers, engine=args.engine,
                       worker_index=args.worker_index, worker_channel=args.worker_channel, **shared)
    except ValueError as exc:
        p.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(args)
    if opts.workers > 1:
        return workers.run(opts, args)  # the primary, or one of the workers it starts
    return app.run(opts)


if __name__ == "__main__":
    sys.exit(main())
