"""The eBPF redirector: capture with bcc programs on the pod's cgroup and network namespace (`bpf/`).

Outbound, `connect4`/`connect6` on the pod's cgroup rewrite the application's TCP connects to the pod's
15001 and record where each was going (and, with DNS capture, UDP and TCP to port 53 go to the agent's
DNS proxy on 127.0.0.1:15053: connect4, sendmsg4, and recvmsg4 for the answers' source); inbound, an `sk_lookup` program in the pod's namespace hands
TCP arriving for the pod to the agent's 15006 listener (HBONE on 15008 and the agent's own ports pass).
The agent's own sockets are not in the pod's cgroup, so they are never rewritten.  Links and maps are
pinned, so capture outlives the agent (pods fail closed) and the next agent adopts it.  No iptables or
nft rule is made in an eBPF-mode pod; the policy routing that brings the application's replies to the
agent's transparent sockets is ip rules and a route only (`routing`, `rules.policy_routing("ebpf")`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from bpf.errors import BpfError, EbpfUnavailable
from bpf.loader import Loader
from bpf.pods import PodPrograms
from mesh import defaults
from nodeagent.errors import NodeAgentError, RedirectError
from nodeagent.pods.source import PodRef
from nodeagent.redirect import routing
from nodeagent.redirect.base import Capture, Outcome
from nodeagent.redirect.rules import policy_routing


class EbpfUnavailableError(NodeAgentError):
    """This node cannot capture with eBPF: the agent refuses to start in that mode."""


class EbpfRedirector:
    mode = "ebpf"

    def __init__(self, loader: Loader, *, dns_capture: bool = defaults.DNS_CAPTURE) -> None:
        self.loader = loader
        self.dns_capture = dns_capture  # the pods' DNS goes to the agent's DNS proxy (sendmsg4, connect4)

    @classmethod
    def open(cls, prefix: str = defaults.BPF_PIN_PREFIX, *, dns_capture: bool = defaults.DNS_CAPTURE) -> EbpfRedirector:
        """A redirector whose programs compiled and whose kernel facilities are there, or
        EbpfUnavailableError naming what is missing (and suggesting --redirect-mode iptables)."""
        try:
            loader = Loader(prefix)
            loader.probe()
        except EbpfUnavailable as exc:
            raise EbpfUnavailableError(str(exc)) from exc
        except BpfError as exc:
            raise EbpfUnavailableError(f"eBPF redirection is unavailable: {exc}; start the node agent with "
                                       "--redirect-mode iptables to capture traffic with iptables instead") from exc
        return cls(loader, dns_capture=dns_capture)

    def install(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> Outcome:
        if not pod.cgroup:
            raise RedirectError(f"pod {pod.key}: its cgroup is not known, so eBPF cannot capture it: start the "
                                "agent with --pod-cgroup (the path format of a pod's cgroup v2 directory)")
        inbound = listeners.get(defaults.INBOUND_PLAIN_PORT)
        if inbound is None:
            raise RedirectError(f"pod {pod.key}: no {defaults.INBOUND_PLAIN_PORT} listener to steer inbound to")
        routed = routing.complete(pod.netns, self.mode)
        routing.install(pod.netns, self.mode)  # first: a redirected connection's replies must find their way
        try:
            done = Outcome(self.loader.attach_pod(pod.key, pod.netns, pod.cgroup, inbound,
                                                  pod_ip=pod.ip or None,
                                                  dns_capture=pod.captures_dns(self.dns_capture)).value)
        except BpfError as exc:
            raise RedirectError(f"pod {pod.key}: {exc}") from exc
        return Outcome.REDONE if done is Outcome.ADOPTED and not routed else done

    def adopt(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> bool:
        if not self.verify(pod).exact:
            return False
        return self.install(pod, listeners) is Outcome.ADOPTED

    def remove(self, pod: PodRef) -> bool:
        try:
            detached = self.loader.detach_pod(pod.key)
        except BpfError as exc:
            raise RedirectError(f"pod {pod.key}: {exc}") from exc
        return routing.remove(pod.netns) or detached

    def verify(self, pod: PodRef) -> Capture:
        try:
            found = self.loader.inspect_pod(pod.key)
        except BpfError as exc:
            raise RedirectError(f"pod {pod.key}: {exc}") from exc
        routes = routing.inspect(pod.netns)
        return Capture(self.mode, present=found.present or not routes.empty,
                       exact=found.exact and routes.exactly(policy_routing(self.mode)),
                       detail=describe(found) + routes.detail())

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        """Outbound (15001): the record the connect hook kept.  Inbound (15006): sk_lookup keeps the
        connection's own destination, so it is the socket's local address."""
        local = sock.getsockname()
        if local[1] != defaults.OUTBOUND_PORT:
            return str(local[0]), int(local[1])
        try:
            return self.loader.original_destination(sock)
        except BpfError as exc:
            raise RedirectError(str(exc)) from exc

    def pods(self) -> list[PodPrograms]:
        """What is pinned for every pod, for `meshctl agent redirect`."""
        return [self.loader.inspect_pod(pod_id) for pod_id in self.loader.list_pods()]


def describe(found: PodPrograms) -> tuple[str, ...]:
    links = [f"{link.program}: link {link.link_id} prog {link.prog_id} tag {link.prog_tag}"
             + (f" cgroup {link.cgroup_id}" if link.cgroup_id else f" netns {link.netns_ino}") for link in found.links]
    maps = [f"map {m.name}: id {m.map_id} {m.entries}/{m.max_entries} entries" for m in found.maps]
    return tuple(links + maps + [f"problem: {p}" for p in found.problems])
