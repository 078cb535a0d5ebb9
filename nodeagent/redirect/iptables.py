"""Install, inspect and remove the in-pod redirect rules in a pod's network namespace.

The pod's namespace is given as a path (`/run/netns/<name>` in the local cluster, `/proc/<pid>/ns/net`
or a CNI netns path on Kubernetes); commands run in it with `nsenter --net=PATH`.  Each change is one
`iptables-restore --noflush` transaction, so a pod never has half our rules.
"""

from __future__ import annotations

import enum
import subprocess

from nodeagent.errors import RedirectError
from nodeagent.redirect.rules import Installed, install_script, parse_saved, remove_script


class Outcome(enum.Enum):
    INSTALLED = "installed"
    ADOPTED = "adopted"  # found exactly our rules, left by an earlier run of the agent
    REDONE = "redone"  # found a partial or different set: removed it and installed ours


def _run(netns_path: str, argv: list[str], stdin: str | None = None) -> str:
    cmd = ["nsenter", f"--net={netns_path}", *argv]
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise RedirectError(f"{argv[0]} is not installed on this node: install iptables") from exc
    except subprocess.TimeoutExpired as exc:
        raise RedirectError(f"{argv[0]} in {netns_path} did not finish in 30s: is the xtables lock held?") from exc
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise RedirectError(f"{' '.join(argv)} in {netns_path} failed: {detail[-1] if detail else out.returncode}")
    return out.stdout


def inspect(netns_path: str) -> Installed:
    return parse_saved(_run(netns_path, ["iptables-save", "-t", "mangle"]) +
                       _run(netns_path, ["iptables-save", "-t", "nat"]))


def install(netns_path: str) -> Outcome:
    """Make the pod's rules exactly ours, whatever an earlier run left."""
    found = inspect(netns_path)
    if not found.empty and found.complete():
        return Outcome.ADOPTED
    outcome = Outcome.INSTALLED
    if not found.empty:
        _run(netns_path, ["iptables-restore", "-w", "5", "--noflush"], remove_script(found.jumps, found.chains))
        outcome = Outcome.REDONE
    _run(netns_path, ["iptables-restore", "-w", "5", "--noflush"], install_script())
    return outcome


def remove(netns_path: str) -> bool:
    """Remove our jumps and chains; returns whether there was anything to remove."""
    found = inspect(netns_path)
    script = remove_script(found.jumps, found.chains)
    if not script:
        return False
    _run(netns_path, ["iptables-restore", "-w", "5", "--noflush"], script)
    return True
