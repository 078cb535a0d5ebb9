"""The iptables redirector: install, inspect and remove the in-pod redirect rules in a pod's netns.

The pod's namespace is given as a path (`/run/netns/<name>` in the local cluster, `/proc/<pid>/ns/net`
or a CNI netns path on Kubernetes); commands run in it with `nsenter --net=PATH`.  Each change is one
`iptables-restore --noflush` transaction, so a pod never has half our rules.  The policy routing that
brings the application's replies back to the agent (`routing`) goes in and out with the rules.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping

from nodeagent.pods.source import PodRef
from nodeagent.redirect import routing
from nodeagent.redirect.base import Capture, Outcome
from nodeagent.redirect.nsexec import run_in
from nodeagent.redirect.rules import (
    DNS_CAPTURE,
    Installed,
    install_script,
    parse_saved,
    policy_routing,
    remove_script,
)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MODE = "iptables"


def inspect(netns_path: str) -> Installed:
    return parse_saved(run_in(netns_path, ["iptables-save", "-t", "mangle"]) +
                       run_in(netns_path, ["iptables-save", "-t", "nat"]))


def install(netns_path: str, dns: bool = DNS_CAPTURE) -> Outcome:
    """Make the pod's rules and policy routing exactly ours, whatever an earlier run left."""
    found = inspect(netns_path)
    routes = routing.inspect(netns_path)
    if not found.empty and found.complete(dns) and routes.exactly(policy_routing(MODE)):
        return Outcome.ADOPTED
    outcome = Outcome.REDONE if not found.empty or not routes.empty else Outcome.INSTALLED
    # first: a redirected connection's replies must already find their way (left alone when exactly ours)
    routing.install(netns_path, MODE)
    # whatever set was there (an earlier version's, half of one) becomes ours in one commit per table:
    # the pod is never left uncaptured in between
    run_in(netns_path, ["iptables-restore", "-w", "5", "--noflush"], install_script(dns, replacing=found.jumps))
    return outcome


def remove(netns_path: str) -> bool:
    """Remove our jumps and chains, then our policy routing; returns whether there was anything to remove."""
    found = inspect(netns_path)
    script = remove_script(found.jumps, found.chains)
    if script:
        run_in(netns_path, ["iptables-restore", "-w", "5", "--noflush"], script)
    return routing.remove(netns_path) or bool(script)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address a connection redirected by iptables REDIRECT was originally going to."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class IptablesRedirector:
    """Capture with nat REDIRECT rules inside the pod's network namespace (Istio's in-pod mode)."""

    mode = MODE

    def __init__(self, *, dns_capture: bool = DNS_CAPTURE) -> None:
        self.dns_capture = dns_capture  # the pods' DNS goes to the agent's DNS proxy

    def install(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> Outcome:
        return install(pod.netns, pod.captures_dns(self.dns_capture))

    def adopt(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> bool:
        return self.verify(pod).exact

    def remove(self, pod: PodRef) -> bool:
        return remove(pod.netns)

    def verify(self, pod: PodRef) -> Capture:
        found = inspect(pod.netns)
        routes = routing.inspect(pod.netns)
        rules = tuple(r for table in sorted(found.rules) for r in found.rules[table])
        exact = not found.empty and found.complete(pod.captures_dns(self.dns_capture)) \
            and routes.exactly(policy_routing(MODE))
        return Capture(self.mode, present=not found.empty or not routes.empty, exact=exact,
                       detail=rules + routes.detail())

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        return original_destination(sock)
