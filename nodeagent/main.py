"""The node agent process: one per node, capturing the traffic of the node's pods that are in the mesh.

    python -m nodeagent.main --node NODE --control-plane HOST:15012 --root-cert FILE --token-file FILE
        --pod-netns /run/netns/amb.<cluster>.pod.{namespace}.{name} [--state-dir DIR] ...
        (on Kubernetes: --pod-source cni --cni-socket /var/run/ambient/cni.sock instead of --pod-netns)

This module only reads the command line; the agent is assembled in `nodeagent.app`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mesh import defaults, runtime
from mesh.errors import MeshError
from nodeagent import app, memory
from nodeagent.cni.protocol import DEFAULT_SOCKET as CNI_SOCKET
from nodeagent.dns.upstream import parse_upstreams, system_upstreams
from nodeagent.options import POD_SOURCES, Options


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="nodeagent", description="The mesh's node agent (one per node).")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--pod-source", choices=POD_SOURCES, default="local",
                   help="where the agent learns its node's pods: local (discovery, netns by --pod-netns) or cni "
                        "(handed over by the CNI plugin on --cni-socket; default %(default)s)")
    p.add_argument("--cni-socket", default=CNI_SOCKET, metavar="PATH",
                   help="pod source cni: the Unix socket the CNI plugin hands pods over on (default %(default)s)")
    p.add_argument("--pod-netns", default="", metavar="FORMAT",
                   help="pod source local (required there): path of a pod's network namespace, with {namespace}, "
                        "{name} and {uid}")
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
    p.add_argument("--hbone-max-connections", type=int, default=defaults.HBONE_MAX_CONNECTIONS, metavar="N",
                   help="HBONE connections each pod's 15008 keeps open at once; more are closed as soon as "
                        "accepted (default %(default)s)")
    p.add_argument("--hbone-max-handshakes", type=int, default=defaults.HBONE_MAX_HANDSHAKES, metavar="N",
                   help="TLS handshakes each pod's 15008 runs at once; more wait their turn within the "
                        "handshake timeout (default %(default)s)")
    p.add_argument("--drain-seconds", type=float, default=defaults.DRAIN_SECONDS, metavar="SECONDS",
                   help="on SIGTERM the agent takes no new connection (a successor started beside it takes "
                        "them) and lets its pods' open connections finish for up to this long, then exits "
                        "(default %(default)s; keep it below the pod's terminationGracePeriodSeconds)")
    p.add_argument("--dns-capture", type=_boolean, default=defaults.DNS_CAPTURE, metavar="true|false",
                   help="answer the pods' DNS queries (port 53, captured to 127.0.0.1:15053 in each pod) for "
                        "services and ServiceEntry hosts, forwarding the rest (default %(default)s)")
    p.add_argument("--dns-upstream", default="", metavar="HOST[:PORT],...",
                   help="where the DNS proxy forwards names it does not know, and resolves DNS ServiceEntry "
                        "endpoints (default: the nameservers of the agent's /etc/resolv.conf)")
    p.add_argument("--dns-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="how long an upstream resolver has to answer (default %(default)s)")
    p.add_argument("--memory-trim-interval", type=float, default=memory.TRIM_INTERVAL, metavar="SECONDS",
                   help="how often the agent looks whether its open connections have fallen a lot, and then "
                        "returns the freed heap to the system (0: never; default %(default)s)")
    runtime.add_flags(p, token_help="this node's token, as the control plane issued it")
    args = p.parse_args(argv)
    try:
        dns_upstream = parse_upstreams(args.dns_upstream) if args.dns_upstream else system_upstreams()
    except MeshError as exc:
        p.error(f"--dns-upstream: {exc}")
    if args.dns_timeout <= 0:
        p.error("--dns-timeout must be positive")
    if args.redirect_mode not in defaults.REDIRECT_MODES:
        p.error(f"REDIRECT_MODE={args.redirect_mode!r} is not a redirect mode (one of: "
                f"{', '.join(defaults.REDIRECT_MODES)})")
    if args.hbone_max_connections < 1 or args.hbone_max_handshakes < 1:
        p.error("--hbone-max-connections and --hbone-max-handshakes must be at least 1")
    if args.drain_seconds < 0:
        p.error("--drain-seconds must not be negative")
    if args.memory_trim_interval < 0:
        p.error("--memory-trim-interval must not be negative")
    if args.pod_source == "local" and not args.pod_netns:
        p.error("--pod-netns is required with --pod-source local")
    return Options(node=args.node, pod_source=args.pod_source, cni_socket=args.cni_socket,
                   pod_netns=args.pod_netns, pod_cgroup=args.pod_cgroup,
                   redirect_mode=args.redirect_mode, bpf_prefix=args.bpf_prefix, state_dir=args.state_dir,
                   hbone_max_connections=args.hbone_max_connections, hbone_max_handshakes=args.hbone_max_handshakes,
                   drain_seconds=args.drain_seconds, dns_capture=args.dns_capture, dns_upstream=dns_upstream,
                   dns_timeout=args.dns_timeout, memory_trim_interval=args.memory_trim_interval,
                   **runtime.flag_values(p, args))


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def main(argv: Sequence[str] | None = None) -> int:
    return app.run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
