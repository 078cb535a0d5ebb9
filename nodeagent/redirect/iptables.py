"""The iptables redirector: install, inspect and remove the in-pod redirect rules in a pod's netns.

The pod's namespace is given as a path (`/run/netns/<name>` in the local cluster, `/proc/<pid>/ns/net`
or a CNI netns path on Kubernetes); commands run in it with `nsenter --net=PATH`.  Each change is one
`iptables-restore --noflush` transaction, so a pod never has half our rules.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
from collections.abc import Mapping

from nodeagent.errors import RedirectError
from nodeagent.pods.source import PodRef
from nodeagent.redirect.base import Capture, Outcome
from nodeagent.redirect.rules import Installed, install_script, parse_saved, remove_script

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


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


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address a connection redirected by iptables REDIRECT was originally going to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return str(ipaddress.IPv4Address(packed)), port


class IptablesRedirector:
    """Capture with nat REDIRECT rules inside the pod's network namespace (Istio's in-pod mode)."""

    mode = "iptables"

    def install(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> Outcome:
        return install(pod.netns)

    def adopt(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> bool:
        return self.verify(pod).exact

    def remove(self, pod: PodRef) -> bool:
        return remove(pod.netns)

    def verify(self, pod: PodRef) -> Capture:
        found = inspect(pod.netns)
        rules = tuple(r for table in sorted(found.rules) for r in found.rules[table])
        return Capture(self.mode, present=not found.empty, exact=not found.empty and found.complete(), detail=rules)

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        return original_destination(sock)
