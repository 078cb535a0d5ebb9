"""Admission allows for the node agents' configuration being a moment ahead of or behind the waypoint's
(`waypoint.inbound.ConfigSkew`): a tunnel for a service bound at the agent but not yet here waits for the
next table, and one for a service just unbound here (not yet at the agent) is still admitted."""

from __future__ import annotations

import time

import pytest
import trio
from waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID
from waypoint_resources import service, workload

from mesh.hbone.headers import parse_authority
from mesh.hbone.server import InboundRequest
from waypoint.config import RouteTable, compile_table
from waypoint.inbound import ConfigSkew, InboundServer, Refusal
from waypoint.l7.model import ClientInfo
from waypoint.proxy import WaypointProxy

pytestmark = pytest.mark.timeout(30)

VIP = "10.96.0.11"


def table(bound: bool) -> RouteTable:
    result = compile_table("bookinfo/waypoint", [workload("reviews-v1", "10.244.2.5", "reviews")],
                           [service("reviews", VIP, waypoint="waypoint" if bound else "")], [])
    assert not result.errors
    return result.table


def request(authority: str = f"{VIP}:9080") -> InboundRequest:
    return InboundRequest(stream_id=1, authority=parse_authority(authority), headers=(), peer=SLEEP_ID,
                          peer_address="10.244.1.7:40000", forwarded_for=None, forwarded_host=None)


def server(start: RouteTable, skew: float) -> tuple[WaypointProxy, InboundServer]:
    proxy = WaypointProxy(None, start)  # type: ignore[arg-type]  # admission never reaches upstream
    return proxy, InboundServer(proxy, None, WAYPOINT_ID, skew_seconds=skew)  # type: ignore[arg-type]


def test_a_binding_the_agent_heard_first_waits_for_the_next_table() -> None:
    proxy, inbound = server(table(bound=False), skew=10.0)

    async def main() -> None:
        decision: list[object] = []

        async def admit() -> None:
            decision.append(await inbound._admit(request()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(admit)
            await trio.sleep(0.1)
            assert decision == []  # still waiting: not refused on the old table
            proxy.update(table(bound=True))
        assert isinstance(decision[0], ClientInfo) and decision[0].original_destination == f"{VIP}:9080"

    trio.run(main)


def test_what_is_never_bound_is_refused() -> None:
    _, inbound = server(table(bound=False), skew=0.2)
    decision = trio.run(inbound._admit, request())
    assert isinstance(decision, Refusal) and decision.status == 400
    assert "does not use waypoint bookinfo/waypoint" in decision.reason
    _, inbound = server(table(bound=True), skew=0.2)
    wrong_port = trio.run(inbound._admit, request(f"{VIP}:81"))
    assert isinstance(wrong_port, Refusal) and "has no port 81" in wrong_port.reason


def test_an_unbinding_the_agent_has_not_heard_of_yet_is_still_admitted() -> None:
    proxy, inbound = server(table(bound=True), skew=10.0)
    assert isinstance(trio.run(inbound._admit, request()), ClientInfo)
    proxy.update(table(bound=False))
    assert isinstance(trio.run(inbound._admit, request()), ClientInfo)
    # ... only the destination admitted before: not another port of it.
    assert inbound.skew.recently_admitted(f"{VIP}:9080", time.monotonic())
    assert not inbound.skew.recently_admitted(f"{VIP}:81", time.monotonic())


def test_skew_memory_expires_and_is_bounded() -> None:
    skew = ConfigSkew(seconds=2.0, limit=4)
    skew.note("a:1", now=100.0)
    assert skew.recently_admitted("a:1", now=101.5)
    assert not skew.recently_admitted("a:1", now=102.5)
    assert not skew.recently_admitted("b:1", now=100.0)
    for i in range(10):
        skew.note(f"x:{i}", now=200.0 + i)
    assert len(skew.admitted) <= 4 and skew.recently_admitted("x:9", now=209.0)
