"""The destination agent preserves the client's address: the application sees who connected, not its
own pod address (as Istio's in-pod mode does with a transparent socket and policy routing).

For real, in a namespace of its own with the production `PodProxy` and capture (iptables, and eBPF
where this machine can run it): a client outside the pod connects in plaintext (captured to 15006) and
over HBONE (15008), and the application must see the client's address, with bytes flowing both ways.
The policy routing that brings the application's replies back to the agent is installed with the
capture and removed with it, exactly.  Plus the pure parts: the admission's source, the routing as data.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import trio

from bpf import layout
from ca.authority import CertificateAuthority
from mesh import defaults
from mesh.hbone.client import open_hbone_connection
from mesh.identity import SpiffeId
from mesh.secrets.tls import client_context
from nodeagent.proxy.admission import Admit, decide, from_connect, plaintext
from nodeagent.redirect.ebpf import EbpfRedirector, EbpfUnavailableError
from nodeagent.redirect.rules import policy_routing
from tests.security.agent_netns import (
    APP_PORT,
    CLIENT_IP,
    POD_IP,
    Certificates,
    EnrolledPod,
    enrolled_pod,
    forget_pins,
    ip,
)
from tests.security.test_agent_self_loops import MESH, POD, connect

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
CLIENT = SpiffeId("cluster.local", "t-sec", "client")


def ebpf_available() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        forget_pins(EbpfRedirector.open(f"t-sec-probe-{os.getpid()}"))
    except EbpfUnavailableError:
        return False
    return True


MODES = ["iptables", pytest.param("ebpf", marks=pytest.mark.skipif(not ebpf_available(),
                                                                   reason="eBPF capture unavailable here"))]


# -- the decision: which address the agent connects from --------------------------------------------------


def test_admission_connects_from_the_clients_address() -> None:
    verdict = decide(MESH, POD, from_connect(connect("10.244.2.3:8080")))
    assert isinstance(verdict, Admit) and verdict.source == "10.244.1.2"
    verdict = decide(MESH, POD, plaintext(POD, ("10.244.2.9", 33000), 8080))
    assert isinstance(verdict, Admit) and verdict.source == "10.244.2.9"


def test_a_pod_calling_itself_connects_from_its_own_address_as_usual() -> None:
    # ztunnel too: a client address that is the pod's own needs no transparent socket.
    verdict = decide(MESH, POD, plaintext(POD, (POD.ip, 33000), 8080))
    assert isinstance(verdict, Admit) and verdict.source is None


def test_policy_routing_as_data() -> None:
    iptables, ebpf = policy_routing("iptables"), policy_routing("ebpf")
    table = str(defaults.INBOUND_ROUTE_TABLE)
    # Istio's in-pod mode: connmark 0x111 (restored on the app's replies) routed to the local table.
    assert [r.words() for r in iptables.rules] == [
        ["pref", str(defaults.INBOUND_RULE_PRIORITY), "fwmark", "0x111/0xfff", "lookup", table]]
    assert iptables.route == ("local", "0.0.0.0/0", "dev", "lo", "table", table)
    # eBPF mode: no iptables, no connmark: the agent's own sockets keep the main table, and replies to
    # the agent's transparent source ports go to the local table.
    lo, hi = defaults.TRANSPARENT_PORTS
    assert [r.words() for r in ebpf.rules] == [
        ["pref", str(defaults.INBOUND_RULE_PRIORITY - 1), "fwmark", "0x539/0xfff", "lookup", "main"],
        ["pref", str(defaults.INBOUND_RULE_PRIORITY), "ipproto", "tcp", "dport", f"{lo}-{hi}", "lookup", table]]
    assert not set(range(lo, hi + 1)) & set(defaults.AGENT_PORTS)
    assert (lo, hi) == (layout.TRANSPARENT_PORT_MIN, layout.TRANSPARENT_PORT_MAX)  # what sk_lookup lets through
    assert hi < 32768  # below Linux's and Windows' ephemeral ranges: clients do not pick these by chance


# -- for real ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    path: Path = tmp_path_factory.mktemp("sec-src-ca")
    return Certificates(CertificateAuthority.load_or_create(path / "ca"))


def our_routing(netns_name: str) -> tuple[list[dict], list[dict]]:
    """The ip rules that look up our table (or sit at our priorities) and the routes of our table."""
    rules = json.loads(ip("-n", netns_name, "-4", "-j", "rule", "show").stdout)
    table = str(defaults.INBOUND_ROUTE_TABLE)
    ours = [r for r in rules if r.get("table") == table
            or r.get("priority") in (defaults.INBOUND_RULE_PRIORITY, defaults.INBOUND_RULE_PRIORITY - 1)]
    routes = json.loads(ip("-n", netns_name, "-4", "-j", "route", "show", "table", table).stdout or "[]")
    return ours, routes


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


async def echo_through(stream: trio.abc.Stream) -> None:
    await stream.send_all(b"ping through the agent\n")
    assert await read_line(stream) == "ping through the agent"


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_plaintext_client_address_is_what_the_application_sees(mode: str) -> None:
    async def main() -> None:
        async with enrolled_pod(mode) as pod:
            sock = pod.client_socket()
            await sock.connect((POD_IP, APP_PORT))  # captured to 15006
            stream = trio.SocketStream(sock)
            seen = await read_line(stream)
            assert seen.rpartition(":")[0] == CLIENT_IP, f"the application saw {seen}, not the client {CLIENT_IP}"
            await echo_through(stream)
            await stream.aclose()
            assert [c.peer[0] for c in pod.app_connections] == [CLIENT_IP]

    trio.run(main)


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_hbone_client_address_is_what_the_application_sees(mode: str, certs: Certificates) -> None:
    async def main() -> None:
        client_svid = await certs.get(CLIENT)
        async with enrolled_pod(mode, certs=certs) as pod, trio.open_nursery() as nursery:
            await certs.get(pod.ref.identity)
            sock = pod.client_socket()
            await sock.connect((POD_IP, defaults.HBONE_PORT))
            conn = await open_hbone_connection(nursery, trio.SocketStream(sock), client_context(client_svid),
                                               expected={pod.ref.identity})
            tunnel = await conn.open_tunnel(f"{POD_IP}:{APP_PORT}")
            seen = await read_line(tunnel)
            assert seen.rpartition(":")[0] == CLIENT_IP, f"the application saw {seen}, not the client {CLIENT_IP}"
            await echo_through(tunnel)
            await tunnel.aclose()
            await conn.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_policy_routing_is_installed_and_removed_with_the_capture(mode: str) -> None:
    found: dict[str, object] = {}

    async def main() -> None:
        async with enrolled_pod(mode) as pod:
            found["during"] = our_routing(pod.netns_name)
            found["netns"] = pod.netns_name
            await trio.to_thread.run_sync(pod.ctx.parts.redirector.remove, pod.ref)
            found["after"] = our_routing(pod.netns_name)
            again = await trio.to_thread.run_sync(pod.ctx.parts.redirector.install, pod.ref, pod.listeners)
            found["again"] = again.value

    trio.run(main)
    rules, routes = found["during"]  # type: ignore[misc]
    expected = policy_routing(mode)
    assert len(rules) == len(expected.rules), rules
    assert [(r["type"], r["dst"], r["dev"]) for r in routes] == [("local", "default", "lo")]
    assert found["after"] == ([], []), "removing the capture left policy routing behind"
    assert found["again"] == "installed"


@needs_root
def test_a_half_installed_routing_is_redone_not_adopted() -> None:
    async def main() -> None:
        async with enrolled_pod("iptables") as pod:
            table = str(defaults.INBOUND_ROUTE_TABLE)
            ip("-n", pod.netns_name, "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", table)
            capture = await trio.to_thread.run_sync(pod.ctx.parts.redirector.verify, pod.ref)
            assert capture.present and not capture.exact
            outcome = await trio.to_thread.run_sync(pod.ctx.parts.redirector.install, pod.ref, pod.listeners)
            assert outcome.value == "redone"
            rules, routes = our_routing(pod.netns_name)
            assert len(rules) == 1 and len(routes) == 1

    trio.run(main)


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_a_client_using_a_transparent_source_port_cannot_bypass_the_capture(mode: str) -> None:
    # In eBPF mode sk_lookup lets the agent's transparent port range through to the application; a
    # client outside the mesh that picks such a port itself must not reach the application unmediated.
    async def main() -> None:
        async with enrolled_pod(mode) as pod:
            with pod.in_client():
                raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.bind((CLIENT_IP, defaults.TRANSPARENT_PORTS[0] + 7))
            sock = trio.socket.from_stdlib_socket(raw)
            reached = False
            with trio.move_on_after(3):
                try:
                    await sock.connect((POD_IP, APP_PORT))
                    seen = await read_line(trio.SocketStream(sock))
                    reached = True
                except OSError:
                    seen = ""
            sock.close()
            if mode == "iptables":  # captured like any other client, through the agent
                assert reached and seen.startswith(CLIENT_IP)
                await trio.sleep(0.3)  # the agent logs the connection once it ended
                assert len(pod.app_connections) == 1 and "inbound" in pod.log.getvalue()
            else:  # the application's SYN-ACK stays in the pod: no handshake, neither way
                assert not reached, f"a client on a transparent port reached the application: {seen}"
                assert not pod.app_connections

    trio.run(main)


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_many_connections_from_one_client_to_one_port(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent's connections to the application leave from the client's address.  In iptables mode the
    # kernel picks their port at connect() (the 4-tuple known), so one client can hold more of them to
    # one port than any fixed range of the agent's own would allow: the reserved range is narrowed here
    # to 64 ports and 300 connections are held at once.  eBPF mode routes the replies by that range, so
    # there it holds fewer connections than the range has ports, from ports of the range.
    narrow = (defaults.TRANSPARENT_PORTS[0], defaults.TRANSPARENT_PORTS[0] + 63)
    monkeypatch.setattr("nodeagent.proxy.sockets.TRANSPARENT_PORTS", narrow)
    count = 300 if mode == "iptables" else 24
    seen: list[str] = []

    async def one(pod: EnrolledPod, opened: list[trio.SocketStream]) -> None:
        sock = pod.client_socket()
        await sock.connect((POD_IP, APP_PORT))  # captured to 15006
        stream = trio.SocketStream(sock)
        opened.append(stream)
        seen.append(await read_line(stream))

    async def main() -> None:
        async with enrolled_pod(mode) as pod:
            opened: list[trio.SocketStream] = []
            try:
                with trio.fail_after(30):
                    async with trio.open_nursery() as nursery:
                        for _ in range(count):
                            nursery.start_soon(one, pod, opened)
                assert len(pod.app_connections) == count
            finally:
                for stream in opened:
                    await stream.aclose()

    trio.run(main)
    assert len(seen) == count
    hosts = {s.rpartition(":")[0] for s in seen}
    ports = [int(s.rpartition(":")[2]) for s in seen]
    assert hosts == {CLIENT_IP}
    assert len(set(ports)) == count  # one application port, one client address: every source port differs
    in_range = [narrow[0] <= p <= narrow[1] for p in ports]
    if mode == "iptables":
        assert not any(in_range), "iptables mode still chooses the agent's source ports itself"
    else:
        assert all(in_range), "eBPF mode must use its reserved ports: the replies are routed by them"
