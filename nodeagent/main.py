"""The node agent process: one per node, capturing the traffic of the node's pods that are in the mesh.

    python -m nodeagent.main --node NODE --control-plane HOST:15012 --root-cert FILE --token-file FILE
        --pod-netns /run/netns/amb.<cluster>.pod.{namespace}.{name} [--state-dir DIR] ...

Assembly, top to bottom (`run`): metrics registry, mesh state, certificates (the CA on the control
plane, asked on behalf of the node's pods with the node's token), the discovery stream feeding the
state, the admin, metrics and readiness servers, then the enroller, which starts a `PodProxy` (the
pod's 15001, 15006 and 15008 listeners) for every pod of this node in the mesh.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from mesh.process import raise_open_files_limit, serve_until_signalled
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig
from mesh.xds.client_state import Update
from mesh.xds.node import ROLE_NODEAGENT, NodeInfo
from mesh.xds.trio_client import open_xds_client
from nodeagent.state import AUTHORIZATION, SERVICE, WORKLOAD, MeshState

log = logging.getLogger("nodeagent")

KIND_OF_TYPE = {rs.WORKLOAD: WORKLOAD, rs.SERVICE: SERVICE, rs.AUTHORIZATION: AUTHORIZATION}


@dataclass(frozen=True)
class Options:
    node: str
    control_plane: str
    root_cert: Path
    token_file: Path
    pod_netns: str
    trust_domain: str = "cluster.local"
    state_dir: Path | None = None
    admin_listen: str = "127.0.0.1:15000"
    metrics_listen: str = "0.0.0.0:15020"
    ready_listen: str = "0.0.0.0:15021"
    cert_ttl: int = 0  # seconds; 0 = the CA's default
    connect_timeout: float = 5.0


def apply_update(state: MeshState, update: Update) -> None:
    """The discovery handler: the only writer of the agent's state (raising NACKs the update)."""
    kind = KIND_OF_TYPE.get(update.type_url)
    if kind is None:
        return
    state.apply(kind, dict(update.updated), update.removed, update.version)


async def run(opts: Options) -> None:
    from mesh.secrets.client import CAClient
    from mesh.secrets.manager import SecretManager
    from nodeagent.app import Agent

    registry = CollectorRegistry()
    state = MeshState()
    root_pem = opts.root_cert.read_bytes()
    token_file = opts.token_file

    def token() -> str:
        return token_file.read_text().strip()

    signer = CAClient(opts.control_plane, root_pem, token)
    certs = SecretManager(signer, root_pem, impersonate=True, ttl_seconds=opts.cert_ttl)
    xds_config = ClientConfig(
        target=opts.control_plane,
        node=NodeInfo(id="", role=ROLE_NODEAGENT, node=opts.node),
        subscriptions={rs.WORKLOAD: None, rs.SERVICE: None, rs.AUTHORIZATION: None},
        root_pem=root_pem, metadata=(("authorization", f"Bearer {token()}"),),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(certs.run)
        async with open_xds_client(xds_config, handler=lambda u: apply_update(state, u)) as xds:
            agent = Agent(opts, state, certs, registry, xds)
            await agent.serve(nursery)
            nursery.cancel_scope.cancel()


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="nodeagent", description="The mesh's node agent (one per node).")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--control-plane", required=True, metavar="HOST:PORT", help="discovery and CA (TLS)")
    p.add_argument("--root-cert", required=True, type=Path, help="the mesh's root certificate (PEM)")
    p.add_argument("--token-file", required=True, type=Path, help="this node's token, as the control plane issued it")
    p.add_argument("--pod-netns", required=True, metavar="FORMAT",
                   help="path of a pod's network namespace, with {namespace}, {name} and {uid}")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--state-dir", type=Path, help="where the agent keeps what it must find after a restart")
    p.add_argument("--admin-listen", default="127.0.0.1:15000")
    p.add_argument("--metrics-listen", default="0.0.0.0:15020")
    p.add_argument("--ready-listen", default="0.0.0.0:15021")
    p.add_argument("--cert-ttl", type=int, default=0, metavar="SECONDS", help="workload certificate lifetime to ask for")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for path, what in ((args.root_cert, "--root-cert"), (args.token_file, "--token-file")):
        if not path.is_file():
            p.error(f"{what} {path}: no such file")
    return Options(node=args.node, control_plane=args.control_plane, root_cert=args.root_cert,
                   token_file=args.token_file, pod_netns=args.pod_netns, trust_domain=args.trust_domain,
                   state_dir=args.state_dir, admin_listen=args.admin_listen, metrics_listen=args.metrics_listen,
                   ready_listen=args.ready_listen, cert_ttl=args.cert_ttl, connect_timeout=args.connect_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    raise_open_files_limit()

    async def body(stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, opts)
            await stop.wait()  # the node's pods keep their rules; the next run adopts them
            nursery.cancel_scope.cancel()

    return serve_until_signalled(body, log, f'{{"event": "stopping", "node": "{opts.node}"}}')

if __name__ == "__main__":
    sys.exit(main())
