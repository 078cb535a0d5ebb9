"""The node agent process: one per node, capturing the traffic of the node's pods that are in the mesh.

    python -m nodeagent.main --node NODE --control-plane HOST:15012 --root-cert FILE --token-file FILE
        --pod-netns /run/netns/amb.<cluster>.pod.{namespace}.{name} [--state-dir DIR] ...

This module only reads the command line; the agent is assembled in `nodeagent.app`.
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--redirect-mode", choices=defaults.REDIRECT_MODES,
                   default=os.environ.get("REDIRECT_MODE") or defaults.REDIRECT_MODE,
                   help="how pods' traffic is captured: iptables or ebpf (default: $REDIRECT_MODE, else "
                        f"{defaults.REDIRECT_MODE})")
    p.add_argument("--bpf-prefix", default=defaults.BPF_PIN_PREFIX, metavar="NAME",
                   help="eBPF mode: the directory under /sys/fs/bpf where this node's pods' programs are pinned "
                        "(default %(default)s)")
    p.add_argument("--state-dir", type=Path, help="where the agent keeps what it must find after a restart")
    runtime.add_flags(p, token_help="this node's token, as the control plane issued it")
    args = p.parse_args(argv)
    if args.redirect_mode not in defaults.REDIRECT_MODES:
        p.error(f"REDIRECT_MODE={args.redirect_mode!r} is not a redirect mode (one of: "
                f"{', '.join(defaults.REDIRECT_MODES)})")
    return Options(node=args.node, pod_netns=args.pod_netns, pod_cgroup=args.pod_cgroup,
                   redirect_mode=args.redirect_mode, bpf_prefix=args.bpf_prefix, state_dir=args.state_dir, **runtime.flag_values(p, args))


def main(argv: Sequence[str] | None = None) -> int:
    return app.run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
