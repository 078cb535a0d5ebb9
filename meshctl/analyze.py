"""`meshctl analyze`: configuration that is accepted but will not do what it says, as `istioctl analyze`.

It asks the control plane (`GET /analyze` on its apply API), which runs the same analysis it uses for
the warnings of `meshctl apply` (`controlplane.analysis`), and prints one line per message:

    Error [AMB0101] (Namespace bookinfo) istio.io/use-waypoint=nosuch names waypoint bookinfo/nosuch, ...
    Warning [AMB0106] (RequestAuthentication jwt.bookinfo) a selector picks workloads' sidecars, ...

The exit status is 79 (istioctl's) when a message is at or above `--failure-threshold` (Error by
default), else 0; 1 when the control plane cannot be asked.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from controlplane.analysis import CODES, Level
from meshctl.config import add_connection_args, client_from
from meshctl.waypoint import require_namespace

FOUND_ISSUES = 79  # istioctl analyze's exit status when it found issues at the failure threshold
_RANK = {Level.INFO.value: 0, Level.WARNING.value: 1, Level.ERROR.value: 2}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    codes = "\n".join(f"  {c.code}  {c.level.value:<7}  {c.name}" for c in CODES)
    p = sub.add_parser(
        "analyze", help="find configuration that is accepted but not enforced as written",
        description="Analyze the mesh's configuration and print what will not work as written: routes and "
                    "policies no waypoint or agent applies, references to things that do not exist, STRICT "
                    "mTLS that refuses callers outside the mesh. Exit status 79 when a message reaches "
                    "--failure-threshold.",
        epilog=f"messages:\n{codes}\n\nexamples:\n  meshctl analyze -n bookinfo\n  meshctl analyze -A -o yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", metavar="NS", help="namespace to analyze (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    p.add_argument("-o", "--output", choices=("log", "yaml", "json"), default="log",
                   help="one line per message (log, the default), or YAML or JSON")
    p.add_argument("--failure-threshold", choices=tuple(_RANK), default=Level.ERROR.value,
                   help="the lowest level that makes the exit status 79 (default: Error)")
    add_connection_args(p)
    p.set_defaults(func=cmd_analyze)


def line(message: dict[str, Any]) -> str:
    return f"{message['level']} [{message['code']}] ({message['origin']}) {message['message']}"


def cmd_analyze(args: argparse.Namespace) -> int:
    client = client_from(args)
    namespace = None if args.all_namespaces else (args.namespace or "default")
    if namespace is not None:
        require_namespace(client, namespace)
    path = "/analyze" + (f"?namespace={namespace}" if namespace else "")
    messages: list[dict[str, Any]] = list(client.request("GET", path)["messages"])
    if args.output == "json":
        print(json.dumps(messages, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(messages, sort_keys=False), end="")
    elif messages:
        for m in messages:
            print(line(m))
    else:
        where = "all namespaces" if namespace is None else f"namespace: {namespace}"
        print(f"\u2714 No validation issues found when analyzing {where}.")
    threshold = _RANK[args.failure_threshold]
    return FOUND_ISSUES if any(_RANK.get(m["level"], 0) >= threshold for m in messages) else 0
