"""`meshctl exec` and `meshctl logs`: work inside a pod of the local cluster, read a pod's or a component's log."""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from localcluster import lifecycle, logs, processes, sandbox, state
from mesh import cgroup as mcgroup
from mesh import logs as mlogs
from mesh.api.schema import parse_duration
from mesh.errors import UsageError
from meshctl import access


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

    lg = sub.add_parser("logs", help="print the log of a pod or of a mesh component",
                        description="Print what a pod or a component of the mesh wrote, as `kubectl logs`. "
                                    "TARGET is a pod in -n NAMESPACE (a waypoint is a pod named as its Gateway), "
                                    "nodeagent/NODE (the node agent, as `kubectl logs ds/ztunnel`), controlplane, "
                                    "controller (the waypoint controller), prometheus, or ds/NAME, deploy/NAME. "
                                    "The mesh's components write one line per record: DATE TIME LEVEL LOGGER "
                                    "MESSAGE, events as JSON objects; access logs one JSON object a line. Needs root.",
                        epilog="examples:\n  meshctl logs nodeagent/node-1 -f\n  meshctl logs controlplane --since 5m\n"
                               "  meshctl logs -n bookinfo waypoint --tail 20\n"
                               "  meshctl logs -n bookinfo productpage-v1",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lg.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default: default)")
    lg.add_argument("--cluster", help="the cluster (default: the current one, see `meshctl cluster use`)")
    lg.add_argument("--tail", type=_count, metavar="N", help="only the last N lines")
    lg.add_argument("--since", type=_since, metavar="DURATION",
                    help="only lines of the last DURATION, e.g. 30s, 5m, 1h (lines that carry a time: the "
                         "mesh's components'; an application's lines carry none)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    lg.add_argument("pod", metavar="TARGET", help="POD, nodeagent/NODE, controlplane, controller, ds/NAME or deploy/NAME")
    lg.set_defaults(func=cmd_logs)


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("exec needs a command: meshctl exec [-n NS] POD -- COMMAND [ARG...]")
    access.require_root("exec")
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


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines (0 or more)")
    return int(text)


def _since(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30s, 5m or 1h") from None
    return seconds


def cmd_logs(args: argparse.Namespace) -> int:
    access.require_root("logs")
    name = state.find_cluster(args.cluster)
    source = logs.find(state.read_record(name), args.pod, args.namespace)
    if source.note:
        print(source.note, file=sys.stderr)
    since = None if args.since is None else datetime.datetime.now() - datetime.timedelta(seconds=args.since)
    try:
        f = open(source.path, "rb")  # noqa: SIM115 - kept open while following
    except FileNotFoundError:
        raise UsageError(f"{source.what} has written no log yet ({source.path} does not exist)") from None
    with f:
        data = f.read()
        if since is not None and data and not any(mlogs.line_time(line) for line in data.splitlines()):
            print(f"the log of {source.what} has no times in it: --since shows none of it (use --tail)",
                  file=sys.stderr)
        sys.stdout.buffer.write(logs.select(data, tail=args.tail, since=since))
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0
