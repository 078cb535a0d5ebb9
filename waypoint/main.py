"""The waypoint process: one per waypoint Gateway, in its own pod, taking a namespace's L7 traffic.

    python -m waypoint.main --name NAME --namespace NS --node NODE --control-plane HOST:15012 \\
        --root-cert FILE --token-file FILE [--trust-domain cluster.local] [--cert-ttl SECONDS] \\
        [--listen 0.0.0.0:15008] [--metrics-listen 0.0.0.0:15020] [--ready-listen 0.0.0.0:15021] \\
        [--admin-listen 127.0.0.1:15000]

The token file holds a workload token for the waypoint's own identity
(`spiffe://<trust domain>/ns/NS/sa/NAME`); with it the waypoint asks the CA for its certificate and
subscribes to discovery.  Access log: one JSON line per request on stdout.  SIGTERM or SIGINT drains
(GOAWAY to clients, tunnels in flight finish within --drain-seconds) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from mesh.process import raise_open_files_limit, serve_until_signalled
from mesh.xds.client import ClientConfig
from mesh.xds.trio_client import open_xds_client
from waypoint.app import Options, Waypoint
from waypoint.discovery import SUBSCRIPTIONS

log = logging.getLogger("waypoint")


async def run(opts: Options, stop: trio.Event, *,
              task_status: trio.TaskStatus[Waypoint] = trio.TASK_STATUS_IGNORED) -> None:
    """Certificates, discovery, then the waypoint itself, until `stop` is set and it has drained."""
    from mesh.secrets.client import CAClient
    from mesh.secrets.manager import SecretManager

    root_pem = opts.root_cert.read_bytes()
    token_file = opts.token_file

    def token() -> str:
        return token_file.read_text().strip()

    signer = CAClient(opts.control_plane, root_pem, token)
    certs = SecretManager(signer, root_pem, impersonate=False, ttl_seconds=opts.cert_ttl)
    xds_config = ClientConfig(target=opts.control_plane, node=opts.node_info(), subscriptions=SUBSCRIPTIONS,
                              root_pem=root_pem, metadata=(("authorization", f"Bearer {token()}"),))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(certs.run)
            waypoint = Waypoint(opts, certs)
            # `serving` is done once the waypoint was stopped and has drained
            async with open_xds_client(xds_config, handler=waypoint.config.handle) as xds, \
                    trio.open_nursery() as serving:
                await serving.start(waypoint.run, xds, stop)
                task_status.started(waypoint)
            nursery.cancel_scope.cancel()
    finally:
        signer.close()


def parse_args(argv: Sequence[str] | None) -> tuple[Options, str]:
    p = argparse.ArgumentParser(prog="waypoint", description="A waypoint: the L7 proxy of a namespace.")
    p.add_argument("--name", required=True, help="the waypoint Gateway's name")
    p.add_argument("--namespace", required=True, help="the waypoint Gateway's namespace")
    p.add_argument("--node", required=True, help="the node this waypoint runs on")
    p.add_argument("--control-plane", required=True, metavar="HOST:PORT", help="discovery and CA (TLS)")
    p.add_argument("--root-cert", required=True, type=Path, help="the mesh's root certificate (PEM)")
    p.add_argument("--token-file", required=True, type=Path,
                   help="a workload token for the waypoint's identity, as the control plane issued it")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--service-account", default="", help="the waypoint's service account (default: --name)")
    p.add_argument("--cert-ttl", type=int, default=0, metavar="SECONDS", help="certificate lifetime to ask for")
    p.add_argument("--listen", default="0.0.0.0:15008", metavar="HOST:PORT", help="HBONE inbound")
    p.add_argument("--metrics-listen", default="0.0.0.0:15020", metavar="HOST:PORT")
    p.add_argument("--ready-listen", default="0.0.0.0:15021", metavar="HOST:PORT")
    p.add_argument("--admin-listen", default="127.0.0.1:15000", metavar="HOST:PORT")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--drain-seconds", type=float, default=2.0, metavar="SECONDS",
                   help="how long tunnels in flight may take to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    for path, what in ((args.root_cert, "--root-cert"), (args.token_file, "--token-file")):
        if not path.is_file():
            p.error(f"{what} {path}: no such file")
    for value, what in ((args.listen, "--listen"), (args.metrics_listen, "--metrics-listen"),
                        (args.ready_listen, "--ready-listen"), (args.admin_listen, "--admin-listen")):
        if not value.rpartition(":")[2].isdigit():
            p.error(f"{what} {value!r} is not HOST:PORT (e.g. 0.0.0.0:15008)")
    opts = Options(name=args.name, namespace=args.namespace, node=args.node, control_plane=args.control_plane,
                   root_cert=args.root_cert, token_file=args.token_file, trust_domain=args.trust_domain,
                   service_account=args.service_account, cert_ttl=args.cert_ttl, listen=args.listen,
                   metrics_listen=args.metrics_listen, ready_listen=args.ready_listen,
                   admin_listen=args.admin_listen, connect_timeout=args.connect_timeout,
                   drain_seconds=args.drain_seconds)
    return opts, args.log_level


def main(argv: Sequence[str] | None = None) -> int:
    opts, level = parse_args(argv)
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("waypoint.access").propagate = False  # access lines go to stdout as bare JSON
    raise_open_files_limit()

    return serve_until_signalled(lambda stop: run(opts, stop), log,
                                 f'{{"event": "stopping", "waypoint": "{opts.key}"}}')

if __name__ == "__main__":
    sys.exit(main())
