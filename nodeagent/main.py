"""The node agent process: one per node, capturing the traffic of the node's pods that are in the mesh.

    python -m nodeagent.main --node NODE --control-plane HOST:15012 --root-cert FILE --token-file FILE
        --pod-netns /run/netns/amb.<cluster>.pod.{namespace}.{name} [--state-dir DIR] ...

This module only reads the command line; the agent is assembled in `nodeagent.app`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mesh import defaults, runtime
from nodeagent import app
from nodeagent.options import Options


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="nodeagent", description="The mesh's node agent (one per node).")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--pod-netns", required=True, metavar="FORMAT",
                   help="path of a pod's network namespace, with {namespace}, {name} and {uid}")
    p.add_argument("--pod-cgroup", default="", metavar="FORMAT",
                   help="path of a pod's cgroup v2 directory, with {namespace}, {name} and {uid} (eBPF mode)")
    p.add_argument("--redirect-mode", choices=defaults.REDIRECT_MODES, default=defaults.REDIRECT_MODE,
                   help="how pods' traffic is captured (default %(default)s)")
    p.add_argument("--state-dir", type=Path, help="where the agent keeps what it must find after a restart")
    runtime.add_flags(p, token_help="this node's token, as the control plane issued it")
    args = p.parse_args(argv)
    return Options(node=args.node, pod_netns=args.pod_netns, pod_cgroup=args.pod_cgroup,
                   redirect_mode=args.redirect_mode, state_dir=args.state_dir, **runtime.flag_values(p, args))


def main(argv: Sequence[str] | None = None) -> int:
    return app.run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
