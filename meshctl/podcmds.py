"""`meshctl exec` and `meshctl logs`: work inside a pod of the local cluster."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from localcluster import lifecycle, processes, sandbox, state
from mesh import cgroup as mcgroup
from mesh.errors import UsageError


def add_parser(sub: Any) -> None:
    ex = sub.add_parser("exec", help="run a command in a pod's network namespace, as the pod's user",
                        description="Run a command in a pod as `kubectl exec` would: in its network namespace "
                                    "and cgroup, with its /etc/hosts and resolv.conf, as its user, without "
                                    "capabilities and without sight of the cluster's state, e.g. `meshctl exec "
                                    "-n bookinfo sleep -- curl -s http://productpage:9080/productpage`.")
    ex.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
    ex.add_argument("--cluster", help="the cluster (default: the only one up)")
    ex.add_argument("pod", help="the pod's name")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    ex.set_defaults(func=cmd_exec)

    lg = sub.add_parser("logs", help="print a pod's log", description="Print what a pod's command wrote.")
    lg.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
    lg.add_argument("--cluster", help="the cluster (default: the only one up)")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    lg.add_argument("pod", help="the pod's name")
    lg.set_defaults(func=cmd_logs)


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("exec needs a command: meshctl exec [-n NS] POD -- COMMAND [ARG...]")
    lifecycle.require_root("exec")
    pod = lifecycle.find_pod(state.find_cluster(args.cluster), args.namespace, args.pod)
    # As `kubectl exec` runs in the container's cgroup (the pod's eBPF capture, on its cgroup, applies) and
    # as the container's user, in its sandbox (`localcluster.sandbox`).  A record without a user (a pod
    # of an older cluster) runs as nobody rather than root.
    group = mcgroup.v2_root() / pod["cgroup"] if pod.get("cgroup") else None
    uid = int(pod.get("runAsUser", sandbox.NOBODY))
    box = sandbox.for_pod(uid, int(pod.get("runAsGroup", uid)), [Path(p) for p in pod.get("expose", [])])
    try:
        return subprocess.run(["ip", "netns", "exec", pod["netns"], *box.argv(command)], check=False,
                              preexec_fn=processes.in_child(group, box)).returncode
    except KeyboardInterrupt:
        return 130


def cmd_logs(args: argparse.Namespace) -> int:
    path = lifecycle.pod_log(state.find_cluster(args.cluster), args.namespace, args.pod)
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        data = f.read()
        if args.tail is not None:
            data = b"\n".join(data.splitlines()[-args.tail:]) + (b"\n" if data else b"")
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0
