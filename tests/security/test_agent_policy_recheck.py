"""An authorization update closes the open inbound connections it now denies, as ztunnel does, and
leaves the others alone.

For real, in a namespace of its own with the production `PodProxy` and capture (iptables): clients
outside the pod open HBONE tunnels (with certificates of two identities) and a plaintext connection
(captured to 15006) to the pod's application; then a policy is applied to the agent's state, as discovery
applies it, with the agent's `Rechecker` listening.  The connections now refused are closed at both ends
(the client's tunnel or connection, and the application's), logged and counted; the others keep relaying.
A burst of updates makes one pass at a time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable

import pytest
import trio

from ca.authority import CertificateAuthority
from mesh import defaults
from mesh.hbone.client import HboneClientConnection, open_hbone_connection
from mesh.hbone.engine import Engine
from mesh.hbone.errors import HboneError
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.tls import client_context
from nodeagent.proxy.recheck import AdmittedConnections, Rechecker
from nodeagent.state import AUTHORIZATION, MeshState
from tests.security.agent_netns import APP_PORT, POD_IP, Certificates, EnrolledPod, enrolled_pod
from tests.security.test_agent_source_address import echo_through, read_line

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")

CLIENT = SpiffeId("cluster.local", "t-sec", "client")
OTHER = SpiffeId("cluster.local", "t-sec", "other")
DEADLINE = 20.0  # generous: a deadline for the test, never a measurement
CLOSED_ERRORS = (HboneError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def policy(name: str, action: pb.AuthorizationAction, match: pb.Match) -> pb.Authorization:
    return pb.Authorization(name=name, namespace="t-sec", scope=pb.NAMESPACE, action=action,
                            rules=[pb.Rule(clauses=[pb.Clause(matches=[match])])])


def principals(*ids: SpiffeId) -> pb.Match:
    return pb.Match(principals=[pb.StringMatch(exact=str(i).removeprefix("spiffe://")) for i in ids])


DENY_CLIENT = policy("deny-client", pb.DENY, principals(CLIENT))
ALLOW_ONLY_OTHER = policy("allow-other", pb.ALLOW, principals(OTHER))
ALLOW_BOTH = policy("allow-other", pb.ALLOW, principals(CLIENT, OTHER))
STRICT = policy("strict", pb.DENY, pb.Match(not_principals=[pb.StringMatch(presence=True)]))


def run(fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE * 2):
            await fn()

    trio.run(main)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(CertificateAuthority.load_or_create(tmp_path_factory.mktemp("sec-recheck-ca") / "ca"))


def listening(pod: EnrolledPod) -> Rechecker:
    """The agent's wiring (`nodeagent.app.Agent`): re-check on the pod's agent state's updates."""
    parts = pod.ctx.parts
    assert parts.engine is not None
    rechecker = Rechecker(parts.engine, parts.state, parts.admitted)
    parts.state.on_change(rechecker.on_change)
    return rechecker


def apply(pod: EnrolledPod, *policies: pb.Authorization, removed: tuple[str, ...] = ()) -> None:
    pod.ctx.parts.state.apply(AUTHORIZATION, {f"{p.namespace}/{p.name}": p for p in policies}, removed)


async def hbone_tunnel(pod: EnrolledPod, certs: Certificates, nursery: trio.Nursery,
                       identity: SpiffeId) -> tuple[HboneClientConnection, trio.abc.Stream]:
    """An HBONE connection with `identity`'s certificate and one tunnel to the application, greeted."""
    sock = pod.client_socket()
    await sock.connect((POD_IP, defaults.HBONE_PORT))
    conn = await open_hbone_connection(nursery, trio.SocketStream(sock), client_context(await certs.get(identity)),
                                       expected={pod.ref.identity})
    tunnel = await conn.open_tunnel(f"{POD_IP}:{APP_PORT}")
    assert await read_line(tunnel)  # the application's greeting: it is connected
    await echo_through(tunnel)
    return conn, tunnel


async def plaintext(pod: EnrolledPod) -> trio.SocketStream:
    sock = pod.client_socket()
    await sock.connect((POD_IP, APP_PORT))  # captured to 15006
    stream = trio.SocketStream(sock)
    assert await read_line(stream)
    await echo_through(stream)
    return stream


async def until_closed(stream: trio.abc.ReceiveStream) -> None:
    """Until the client's side ends (reset or end of stream); nothing more is expected on it."""
    try:
        while await stream.receive_some(65536):
            pass
    except CLOSED_ERRORS:
        pass


def closed_with_rbac(pod: EnrolledPod) -> float:
    total = 0.0
    for metric in pod.registry.collect():
        for sample in metric.samples:
            if sample.name == "istio_tcp_connections_closed_total" and sample.labels.get("response_flags") == "RBAC":
                total += sample.value
    return total


@needs_root
def test_a_deny_closes_the_open_tunnel_of_that_identity_and_not_the_others(
        certs: Certificates, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.inbound")

    async def main() -> None:
        async with enrolled_pod("iptables", certs=certs) as pod, trio.open_nursery() as nursery:
            await certs.get(pod.ref.identity)
            rechecker = listening(pod)
            _, denied = await hbone_tunnel(pod, certs, nursery, CLIENT)
            _, allowed = await hbone_tunnel(pod, certs, nursery, OTHER)
            assert len(pod.app_connections) == 2  # in that order: the denied one's, the allowed one's
            before = pod.refusals("denied")

            apply(pod, DENY_CLIENT)
            with trio.fail_after(DEADLINE):
                await until_closed(denied)
                await pod.app_connections[0].closed.wait()  # the application's side is closed too

            await echo_through(allowed)  # still allowed: untouched, and relaying
            assert not pod.app_connections[1].closed.is_set()
            assert rechecker.closed == 1
            with trio.fail_after(DEADLINE):  # the outcome is recorded once the relay has ended
                while pod.refusals("denied") == before:
                    await trio.sleep(0.01)
            assert pod.refusals("denied") == before + 1
            assert closed_with_rbac(pod) == 1
            assert "closed after a policy update" in pod.log.getvalue()
            nursery.cancel_scope.cancel()

    run(main)
    closures = [r.getMessage() for r in caplog.records if "now refused" in r.getMessage()]
    assert len(closures) == 1, closures
    assert "t-sec/app" in closures[0] and str(CLIENT) in closures[0] and "deny-client" in closures[0]


@needs_root
def test_an_allow_that_no_longer_names_the_client_closes_its_tunnel(certs: Certificates) -> None:
    async def main() -> None:
        async with enrolled_pod("iptables", certs=certs) as pod, trio.open_nursery() as nursery:
            await certs.get(pod.ref.identity)
            listening(pod)
            apply(pod, ALLOW_BOTH)
            _, dropped = await hbone_tunnel(pod, certs, nursery, CLIENT)
            _, kept = await hbone_tunnel(pod, certs, nursery, OTHER)

            apply(pod, ALLOW_ONLY_OTHER)  # the same policy, updated
            with trio.fail_after(DEADLINE):
                await until_closed(dropped)
                await pod.app_connections[0].closed.wait()
            await echo_through(kept)
            nursery.cancel_scope.cancel()

    run(main)


@needs_root
def test_strict_closes_an_open_plaintext_connection_and_keeps_the_tunnels(certs: Certificates) -> None:
    async def main() -> None:
        async with enrolled_pod("iptables", certs=certs) as pod, trio.open_nursery() as nursery:
            await certs.get(pod.ref.identity)
            rechecker = listening(pod)
            plain = await plaintext(pod)
            _, tunnel = await hbone_tunnel(pod, certs, nursery, CLIENT)

            apply(pod, DENY_CLIENT, removed=())  # not about plaintext: it stays
            with trio.fail_after(DEADLINE):
                await until_closed(tunnel)
            await echo_through(plain)

            _, other = await hbone_tunnel(pod, certs, nursery, OTHER)
            apply(pod, STRICT)  # connections without a principal are now refused
            with trio.fail_after(DEADLINE):
                await until_closed(plain)
                await pod.app_connections[0].closed.wait()
            await echo_through(other)
            assert rechecker.closed == 2
            nursery.cancel_scope.cancel()

    run(main)


@needs_root
def test_a_burst_of_updates_makes_one_pass_that_reads_the_newest_state(certs: Certificates) -> None:
    async def main() -> None:
        async with enrolled_pod("iptables", certs=certs) as pod, trio.open_nursery() as nursery:
            await certs.get(pod.ref.identity)
            rechecker = listening(pod)
            engine = pod.ctx.parts.engine
            assert engine is not None
            _, denied = await hbone_tunnel(pod, certs, nursery, CLIENT)
            _, allowed = await hbone_tunnel(pod, certs, nursery, OTHER)

            # The engine held busy while the burst is applied (from another thread, as discovery's), so
            # that what is counted is the coalescing, not how fast the engine happens to be.
            busy, release = threading.Event(), threading.Event()

            def hold() -> None:
                busy.set()
                release.wait(DEADLINE)

            engine.call_soon(hold)
            await trio.to_thread.run_sync(busy.wait, DEADLINE)
            passes = rechecker.passes

            def burst() -> None:
                for i in range(49):  # denied, allowed, denied... ending with the deny (i = 48)
                    if i % 2:
                        apply(pod, removed=("t-sec/deny-client",))
                    else:
                        apply(pod, DENY_CLIENT)

            await trio.to_thread.run_sync(burst)
            release.set()

            async def settled() -> None:  # after the pass the burst scheduled
                pass

            await engine.call(settled)
            assert rechecker.passes == passes + 1
            with trio.fail_after(DEADLINE):
                await until_closed(denied)
                await pod.app_connections[0].closed.wait()
            await echo_through(allowed)
            assert rechecker.closed == 1

            apply(pod, ALLOW_ONLY_OTHER)  # a later update: a pass of its own
            await engine.call(settled)
            assert rechecker.passes == passes + 2
            await echo_through(allowed)
            nursery.cancel_scope.cancel()

    run(main)


def test_without_a_running_engine_an_update_schedules_nothing_and_later_ones_still_do() -> None:
    state, engine = MeshState(), Engine()
    rechecker = Rechecker(engine, state, AdmittedConnections())
    state.on_change(rechecker.on_change)
    state.apply(AUTHORIZATION, {"t-sec/strict": STRICT}, ())  # the engine is not running: nothing is open
    assert rechecker.passes == 0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await trio.to_thread.run_sync(state.apply, AUTHORIZATION, {"t-sec/strict": STRICT}, ())

            async def settled() -> None:
                pass

            await engine.call(settled)
            assert rechecker.passes == 1  # not stuck as pending from the first update
            nursery.cancel_scope.cancel()

    run(main)
