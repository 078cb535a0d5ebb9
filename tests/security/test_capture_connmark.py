"""The iptables capture restores the connmark only on the application's replies (issue 14), and that
takes nothing away: the replies of the agent's transparent connections still find the agent, captured
connections both ways still work, and a pod holding the rules of the version before is redone on
install, not adopted.

For real, with the production `PodProxy` and iptables capture in a namespace of its own
(`tests.security.agent_netns`).  The rule itself is checked as data in
`tests/unit/nodeagent/test_redirect_rules.py`.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import trio

from mesh import defaults
from mesh.hbone.client import open_hbone_connection
from mesh.identity import SpiffeId
from mesh.secrets.tls import client_context
from nodeagent.redirect import iptables
from nodeagent.redirect.rules import CHAIN_OUTPUT, remove_script
from tests.security.agent_netns import APP_PORT, CLIENT_IP, POD_IP, Certificates, EnrolledPod, enrolled_pod
from tests.security.test_agent_source_address import certs, echo_through, read_line  # noqa: F401 (a fixture)
from tests.unit.nodeagent.test_redirect_rules import PREVIOUS_VERSION

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
CLIENT = SpiffeId("cluster.local", "t-sec", "client")


def in_pod(pod: EnrolledPod, *argv: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", pod.netns_name, *argv], input=stdin, capture_output=True,
                          text=True, check=True).stdout


def restored(pod: EnrolledPod) -> int:
    """Packets the mangle restore rule has marked so far."""
    out = in_pod(pod, "iptables", "-t", "mangle", "-L", CHAIN_OUTPUT, "-v", "-x", "-n")
    return sum(int(line.split()[0]) for line in out.splitlines() if "CONNMARK restore" in line)


async def plaintext_round(pod: EnrolledPod) -> None:
    sock = pod.client_socket()
    await sock.connect((POD_IP, APP_PORT))  # captured to 15006; the agent connects from the client's address
    stream = trio.SocketStream(sock)
    assert (await read_line(stream)).rpartition(":")[0] == CLIENT_IP
    await echo_through(stream)
    await stream.aclose()


def test_the_applications_replies_are_restored_and_reach_the_agent(certs: Certificates) -> None:  # noqa: F811
    async def main() -> None:
        client_svid = await certs.get(CLIENT)
        async with enrolled_pod("iptables", certs=certs) as pod, trio.open_nursery() as nursery:
            await certs.get(pod.ref.identity)
            before = restored(pod)
            sock = pod.client_socket()
            await sock.connect((POD_IP, defaults.HBONE_PORT))
            conn = await open_hbone_connection(nursery, trio.SocketStream(sock), client_context(client_svid),
                                               expected={pod.ref.identity})
            tunnel = await conn.open_tunnel(f"{POD_IP}:{APP_PORT}")
            assert (await read_line(tunnel)).rpartition(":")[0] == CLIENT_IP
            for _ in range(20):
                await echo_through(tunnel)
            await plaintext_round(pod)
            # the application's replies (its greeting and 20 echoes at least) were marked, so routed back
            assert restored(pod) - before >= 21
            tracked = in_pod(pod, "cat", "/proc/net/nf_conntrack")
            assert [line for line in tracked.splitlines()
                    if f"src={CLIENT_IP} dst={POD_IP}" in line and f"dport={APP_PORT} " in line and "mark=273" in line]
            await tunnel.aclose()
            await conn.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_previous_versions_rules_are_redone_not_adopted() -> None:
    async def main() -> None:
        async with enrolled_pod("iptables") as pod:
            found = iptables.inspect(pod.ref.netns)
            in_pod(pod, "iptables-restore", "-w", "5", "--noflush", stdin=remove_script(found.jumps, found.chains))
            # what an agent of the version before installed (its policy routing is the same)
            in_pod(pod, "iptables-restore", "-w", "5", "--noflush", stdin=PREVIOUS_VERSION)
            redirector = pod.ctx.parts.redirector
            capture = await trio.to_thread.run_sync(redirector.verify, pod.ref)
            assert capture.present and not capture.exact
            assert not await trio.to_thread.run_sync(redirector.adopt, pod.ref, pod.listeners)
            outcome = await trio.to_thread.run_sync(redirector.install, pod.ref, pod.listeners)
            assert outcome.value == "redone"
            assert (await trio.to_thread.run_sync(redirector.verify, pod.ref)).exact
            saved = in_pod(pod, "iptables-save")
            assert saved.count("--restore-mark") == 1 and "--ctdir REPLY" in saved
            await plaintext_round(pod)  # and the capture works end to end

    trio.run(main)
