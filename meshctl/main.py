"""`meshctl`: the command-line entry point.

Each verb lives in its own module under `meshctl` and exposes `add_parser(subparsers)`, which adds
its sub-parser and sets `func(args) -> int` on it. This module only assembles them and turns a
`MeshError` into one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mesh.errors import MeshError
from meshctl import access

# Modules that contribute verbs, in the order `meshctl --help` lists them.  A module that is not
# present yet (a component still being written) is skipped, so the CLI never breaks on import.
VERB_MODULES = (
    "meshctl.cluster",
    "meshctl.podcmds",
    "meshctl.config",
    "meshctl.waypoint",
    "meshctl.analyze",
    "meshctl.ca",
    "meshctl.proxystatus",
    "meshctl.agent",
    "meshctl.loglevel",
    "meshctl.version",
    "meshctl.bench",
    "meshctl.dashboard.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl",
        description="Run and inspect an ambient (sidecarless) service mesh and its local cluster.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except MeshError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:  # what a verb did not check first (`meshctl.access`), said the same way
        where = f" ({exc.filename}: permission denied)" if exc.filename else ""
        print(f"meshctl: {access.needs_root_message(args.verb)}{where}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`meshctl logs ... | head`)
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("meshctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
