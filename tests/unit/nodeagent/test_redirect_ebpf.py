"""The eBPF redirector's own decisions, around a stand-in for the loader (the loader itself runs for
real in tests/integration/test_bpf_redirect.py, and the agent in eBPF mode in test_mesh.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf.errors import EbpfUnavailable, PodTargetError
from bpf.loader import Loader
from bpf.pods import Outcome as BpfOutcome
from bpf.pods import PodPrograms
from mesh.identity import SpiffeId
from nodeagent.app import open_redirector
from nodeagent.errors import RedirectError
from nodeagent.pods.source import PodRef
from nodeagent.redirect.base import Outcome
from nodeagent.redirect.ebpf import EbpfRedirector, EbpfUnavailableError
from nodeagent.redirect.iptables import IptablesRedirector

POD = PodRef("uid-1", "default", "web", "10.244.1.5", SpiffeId("cluster.local", "default", "web"),
             "/run/netns/x", "/sys/fs/cgroup/unified/amb.t/pod.default.web")


class StandIn:
    """What the redirector asks of the loader, scripted."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[object, ...]] = []

    def attach_pod(self, pod_id: str, netns: str, cgroup: str, listener: socket.socket, *,
                   pod_ip: str | None = None, dns_capture: bool = False) -> BpfOutcome:
        self.calls.append(("attach", pod_id, netns, cgroup, pod_ip))
        if self.fail:
            raise self.fail
        return BpfOutcome.INSTALLED

    def inspect_pod(self, pod_id: str) -> PodPrograms:
        return PodPrograms(pod_id, Path("/sys/fs/bpf/x") / pod_id, problems=("map orig_by_cookie is not pinned",))

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        return "10.96.0.10", 9080


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


def test_the_pod_is_attached_by_its_key_with_its_ip(listener: socket.socket) -> None:
    loader = StandIn()
    assert EbpfRedirector(loader).install(POD, {15006: listener}) is Outcome.INSTALLED  # type: ignore[arg-type]
    assert loader.calls == [("attach", "default/web", POD.netns, POD.cgroup, "10.244.1.5")]


def test_a_pod_without_a_known_cgroup_is_refused_with_the_flag_to_set(listener: socket.socket) -> None:
    pod = PodRef(POD.uid, POD.namespace, POD.name, POD.ip, POD.identity, POD.netns, "")
    with pytest.raises(RedirectError, match="start the agent with --pod-cgroup"):
        EbpfRedirector(StandIn()).install(pod, {15006: listener})  # type: ignore[arg-type]


def test_loader_errors_become_the_agents_redirect_errors(listener: socket.socket) -> None:
    loader = StandIn(PodTargetError("cgroup /x does not exist"))
    with pytest.raises(RedirectError, match="pod default/web: cgroup /x does not exist"):
        EbpfRedirector(loader).install(POD, {15006: listener})  # type: ignore[arg-type]


def test_partial_pins_are_present_but_not_adoptable(listener: socket.socket) -> None:
    redirector = EbpfRedirector(StandIn())  # type: ignore[arg-type]
    found = redirector.verify(POD)
    assert found.present and not found.exact and "problem: map orig_by_cookie is not pinned" in found.detail
    assert not redirector.adopt(POD, {15006: listener})


def test_inbound_keeps_its_own_destination() -> None:
    redirector = EbpfRedirector(StandIn())  # type: ignore[arg-type]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                assert redirector.original_destination(accepted) == server.getsockname()
                assert client.getpeername() == server.getsockname()


def test_a_node_that_cannot_run_ebpf_refuses_to_start_in_that_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(self: Loader) -> None:
        raise EbpfUnavailable("the kernel has no BPF_PROG_TYPE_SK_LOOKUP")

    monkeypatch.setattr(Loader, "probe", unavailable)
    with pytest.raises(EbpfUnavailableError) as info:
        open_redirector("ebpf", "ambt-unit")
    message = str(info.value)
    assert "BPF_PROG_TYPE_SK_LOOKUP" in message and "--redirect-mode iptables" in message
    assert "\n" not in message
    assert isinstance(open_redirector("iptables", "ambt-unit"), IptablesRedirector)
