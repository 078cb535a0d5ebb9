"""The control plane process: discovery and CA on one TLS gRPC port, the apply API, metrics.

    python -m controlplane.main --state-dir DIR [--grpc-listen 0.0.0.0:15012]
        [--metrics-listen 0.0.0.0:15014] [--trust-domain cluster.local] [--serving-host NAME ...]
        [--config-source local|kubernetes] [--kubeconfig FILE] [--webhook-listen 0.0.0.0:15017]
        [--node-agent-account NS/SA ...] [--token-ttl SECONDS] [--token-key-rotation SECONDS]

What DIR holds is in `controlplane.options`; the assembly is `controlplane.app`.  Runs until SIGTERM or
SIGINT, then shuts down in the reverse order.  `--plaintext` serves gRPC without TLS (debugging only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ca.tokenreview import DEFAULT_NODE_AGENT_ACCOUNTS, parse_account
from controlplane import app
from controlplane.options import CONFIG_SOURCES, LOCAL, Options
from mesh import defaults, logs
from mesh.errors import MeshError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlplane.main",
        description="Run the mesh control plane: discovery (delta xDS) and CA on TLS gRPC, the apply API, metrics.",
    )
    p.add_argument("--state-dir", type=Path, required=True, help="cluster state directory (uses DIR/controlplane/)")
    p.add_argument("--grpc-listen", default=defaults.CONTROLPLANE_GRPC_LISTEN,
                   help="discovery + CA, TLS (default %(default)s)")
    p.add_argument("--metrics-listen", default=defaults.CONTROLPLANE_METRICS_LISTEN,
                   help="Prometheus /metrics (default %(default)s)")
    p.add_argument("--trust-domain", default=defaults.TRUST_DOMAIN, help="SPIFFE trust domain (default %(default)s)")
    p.add_argument(
        "--serving-host",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP clients dial, put in the serving certificate (repeatable; default localhost, 127.0.0.1)",
    )
    p.add_argument("--plaintext", action="store_true", help="no TLS (debugging only)")
    p.add_argument("--debounce", type=float, default=0.0, help="seconds to gather changes before a push")
    p.add_argument("--config-source", choices=CONFIG_SOURCES, default=LOCAL,
                   help="where the configuration comes from: the local store and its apply API, or the "
                        "Kubernetes API (with TokenReview authentication and the admission webhook) "
                        "(default %(default)s)")
    p.add_argument("--kubeconfig", type=Path, metavar="FILE",
                   help="kubernetes: the kubeconfig to use (default: the pod's in-cluster configuration)")
    p.add_argument("--webhook-listen", default=defaults.CONTROLPLANE_WEBHOOK_LISTEN,
                   help="kubernetes: the admission webhook, HTTPS (default %(default)s)")
    p.add_argument("--node-agent-account", action="append", type=_account, metavar="NS/SA",
                   help="kubernetes: the service account of the node agents, allowed to ask for the "
                        "identities of pods on their node (repeatable; default "
                        f"{', '.join(DEFAULT_NODE_AGENT_ACCOUNTS)})")
    p.add_argument("--token-ttl", type=_positive, default=Options.token_ttl, metavar="SECONDS",
                   help="local: the lifetime of the tokens the apply API mints, and the most a request may ask "
                        "for (default %(default)g, an hour; holders are given new ones before they expire)")
    p.add_argument("--token-key-rotation", type=_not_negative, default=Options.token_key_rotation, metavar="SECONDS",
                   help="local: rotate the token signing key when it is this old, keeping the old key for one "
                        "token lifetime (default 0: only with `meshctl ca rotate-token-key`)")
    p.add_argument("--log-level", default="info", choices=logs.LEVELS)
    return p


def _positive(text: str) -> float:
    value = _not_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _account(text: str) -> str:
    try:
        parse_account(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)  # one format for every component (`mesh.logs`), on standard output
    opts = Options(state_dir=args.state_dir, grpc_listen=args.grpc_listen, metrics_listen=args.metrics_listen,
                   trust_domain=args.trust_domain, serving_hosts=args.serving_host, plaintext=args.plaintext,
                   debounce=args.debounce, config_source=args.config_source, kubeconfig=args.kubeconfig,
                   webhook_listen=args.webhook_listen,
                   node_agent_accounts=args.node_agent_account or list(DEFAULT_NODE_AGENT_ACCOUNTS),
                   token_ttl=args.token_ttl, token_key_rotation=args.token_key_rotation)
    try:
        app.run(opts)
    except (MeshError, OSError) as exc:
        print(f"controlplane: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
