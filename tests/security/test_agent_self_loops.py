"""Agent self-loops: a connection addressed to the node agent itself (its own ports, loopback, or the very
listener it arrived on) is refused by the pure decisions, as ztunnel refuses a `SelfCall`; before, the
agent dialled itself without end and ran out of descriptors for every pod of the node.

The decisions first (routing.decide for 15001, admission.decide for 15006 and 15008), then the real
thing: the production `PodProxy` in a network namespace of its own with the real iptables capture,
and an application in it connecting to 127.0.0.1:15001 and to its own address on 15006.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import trio

from mesh import defaults
from mesh.hbone.headers import Authority
from mesh.hbone.server import InboundRequest
from nodeagent.metrics import FailureReason, ResponseFlag
from nodeagent.proxy.admission import Admit, Refusal, from_connect, plaintext
from nodeagent.proxy.admission import decide as admit
from nodeagent.proxy.routing import RouteKind
from nodeagent.proxy.routing import decide as route
from tests.security.agent_netns import POD_IP, enrolled_pod
from tests.unit.nodeagent.agent_resources import SLEEP, WEB, identity, pod_of, view

WEB2 = WEB[1]  # 10.244.2.3: the pod whose agent decides inbound
POD = pod_of(WEB2)
SLEEP_POD = pod_of(SLEEP)  # 10.244.1.2: the pod whose agent decides outbound
MESH = view(SLEEP, *WEB)


def connect(authority: str) -> InboundRequest:
    host, _, port = authority.rpartition(":")
    return InboundRequest(stream_id=1, authority=Authority(host, int(port)), headers=(), peer=identity("sleep"),
                          peer_address="10.244.1.2:51000", forwarded_for="10.244.1.2:40112", forwarded_host=None)


# -- outbound (15001): routing.decide ---------------------------------------------------------------------


@pytest.mark.parametrize("dst", ["127.0.0.1:15001", "127.0.0.1:8080", "127.1.2.3:15006", "0.0.0.0:15001"])
def test_outbound_to_loopback_is_a_self_call(dst: str) -> None:
    # iptables never redirects loopback, eBPF neither: the app reached the agent's listener directly.
    ip, _, port = dst.rpartition(":")
    r = route(MESH, SLEEP, ip, int(port), pod_ip=SLEEP_POD.ip, arrived_at=("127.0.0.1", 15001))
    assert r.kind is RouteKind.SELF_CALL, r
    assert r.next_hop is None


@pytest.mark.parametrize("port", defaults.AGENT_PORTS)
def test_outbound_to_the_pods_own_address_on_an_agent_port_is_a_self_call(port: int) -> None:
    r = route(MESH, SLEEP, SLEEP_POD.ip, port, pod_ip=SLEEP_POD.ip, arrived_at=(SLEEP_POD.ip, 15001))
    assert r.kind is RouteKind.SELF_CALL, r


def test_outbound_that_was_never_redirected_is_a_self_call() -> None:
    # The original destination is the listener's own address: nothing redirected it.
    r = route(MESH, SLEEP, "10.244.1.99", 15001, pod_ip=SLEEP_POD.ip, arrived_at=("10.244.1.99", 15001))
    assert r.kind is RouteKind.SELF_CALL


def test_outbound_to_an_agent_port_of_another_pod_is_refused_at_the_source() -> None:
    # HBONE to web-2 with :authority 10.244.2.3:15006 would make web-2's agent dial its own 15006.
    for port in (defaults.OUTBOUND_PORT, defaults.INBOUND_PLAIN_PORT, defaults.HBONE_PORT):
        r = route(MESH, SLEEP, WEB2.addresses[0], port, pod_ip=SLEEP_POD.ip, arrived_at=("127.0.0.1", 15001))
        assert r.kind is RouteKind.SELF_CALL, (port, r)


def test_ordinary_outbound_is_unchanged() -> None:
    r = route(MESH, SLEEP, WEB2.addresses[0], 8080, pod_ip=SLEEP_POD.ip, arrived_at=("127.0.0.1", 15001))
    assert r.kind is RouteKind.HBONE and r.next_hop == ("10.244.2.3", 15008)


# -- inbound (15006, 15008): admission.decide -------------------------------------------------------------


@pytest.mark.parametrize("port", defaults.AGENT_PORTS)
def test_hbone_connect_to_an_agent_port_of_this_pod_is_refused(port: int) -> None:
    verdict = admit(MESH, POD, from_connect(connect(f"10.244.2.3:{port}")))
    assert isinstance(verdict, Refusal), verdict
    assert (verdict.status, verdict.flag, verdict.failure) == (400, ResponseFlag.NO_ROUTE, FailureReason.SELF_CALL)
    assert "agent" in verdict.reason


@pytest.mark.parametrize("port", defaults.AGENT_PORTS)
def test_plaintext_to_an_agent_port_is_refused(port: int) -> None:
    verdict = admit(MESH, POD, plaintext(POD, ("10.244.2.9", 33000), port))
    assert isinstance(verdict, Refusal) and verdict.failure is FailureReason.SELF_CALL, verdict


def test_plaintext_that_arrived_on_loopback_is_refused() -> None:
    # An app inside the pod connecting to 127.0.0.1:<anything the agent listens on>.
    verdict = admit(MESH, POD, plaintext(POD, ("127.0.0.1", 40000), 15006, host="127.0.0.1"))
    assert isinstance(verdict, Refusal) and verdict.failure is FailureReason.SELF_CALL, verdict


def test_ordinary_inbound_is_unchanged() -> None:
    assert isinstance(admit(MESH, POD, from_connect(connect("10.244.2.3:8080"))), Admit)
    assert isinstance(admit(MESH, POD, plaintext(POD, ("10.244.2.9", 33000), 8080)), Admit)


# -- for real: the production PodProxy in a namespace, with the iptables capture -----------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a network namespace and iptables")


def established(netns_name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns_name, "ss", "-Htn", "state", "established"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


@needs_root
@pytest.mark.parametrize("target", ["loopback-15001", "own-ip-15006", "own-ip-15001"])
def test_an_app_calling_the_agent_directly_does_not_make_it_dial_itself(target: str) -> None:
    host, port = {"loopback-15001": ("127.0.0.1", 15001), "own-ip-15006": (POD_IP, 15006),
                  "own-ip-15001": (POD_IP, 15001)}[target]

    async def main() -> None:
        async with enrolled_pod() as pod:
            sock = pod.app_socket()
            await sock.connect((host, port))
            await trio.sleep(1.0)  # a loop makes thousands of connections in this time
            count = await trio.to_thread.run_sync(established, pod.netns_name)
            assert count <= 4, f"{count} established connections in the pod: the agent is dialling itself"
            data: bytes | None = None
            with trio.move_on_after(2):
                try:
                    data = await sock.recv(1)
                except OSError:
                    data = b""
            sock.close()
            assert data == b"", "the agent should have closed the connection"
            assert pod.refusals() >= 1

    t0 = time.monotonic()
    trio.run(main)
    assert time.monotonic() - t0 < 30
