"""The policy routing of a captured pod (`rules.policy_routing`), applied in the pod's namespace with
`ip`: inspected, installed and removed exactly, by both redirectors beside their capture.

The destination agent connects to the application from the client's address; these rules bring the
application's replies back to the agent (rules.py says how, per mode).  Removal takes our rules of
either mode (a node may have switched modes) and our route, and nothing else.  A namespace that does
not exist (any more) has none: nothing is found or removed there, and installing is left to fail in
the capture's own step, which names what is missing.
"""

from __future__ import annotations

import os

from nodeagent.redirect.nsexec import run_in
from nodeagent.redirect.rules import (
    ROUTE_TABLE,
    RoutingFound,
    parse_routing,
    policy_routing,
    routing_install_script,
    routing_remove_script,
)

NO_TABLE = ("FIB table does not exist",)


def inspect(netns_path: str) -> RoutingFound:
    if not os.path.exists(netns_path):
        return RoutingFound((), False)
    rules = run_in(netns_path, ["ip", "-4", "-j", "rule", "show"])
    routes = run_in(netns_path, ["ip", "-4", "-j", "route", "show", "table", str(ROUTE_TABLE)], ok_errors=NO_TABLE)
    return parse_routing(rules, routes)


def complete(netns_path: str, mode: str) -> bool:
    return inspect(netns_path).exactly(policy_routing(mode))


def install(netns_path: str, mode: str) -> None:
    """Make the pod's policy routing exactly that of `mode`, whatever was there of ours."""
    found = inspect(netns_path)
    if found.exactly(policy_routing(mode)) or not os.path.exists(netns_path):
        return
    remove_found(netns_path, found)
    run_in(netns_path, ["ip", "-batch", "-"], routing_install_script(policy_routing(mode)))


def remove(netns_path: str) -> bool:
    """Remove our rules and route; whether there was any."""
    return remove_found(netns_path, inspect(netns_path))


def remove_found(netns_path: str, found: RoutingFound) -> bool:
    script = routing_remove_script(found)
    if script:
        run_in(netns_path, ["ip", "-batch", "-"], script)
    return bool(script)
