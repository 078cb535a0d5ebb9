"""Outbound (15001): what a pod's application sends, captured by its redirect rules.

Decide, then do (STYLE.md 2): the original destination goes through `routing.decide`, and the `Route`
it returns is carried out by one function per kind: HBONE to the destination's node agent or to a
waypoint (from inside the pod's namespace, with the pod's certificate, expecting the destination's
identity), plain TCP to a destination outside the mesh, or a refusal.  Whatever happens is recorded
once, by the connection's `ConnectionOutcome`.  It all runs on the engine (`mesh.hbone.engine`): the
client is a `PlainEnd` whose bytes wait (kept, not read further than a first chunk) for the upstream.
"""

from __future__ import annotations

from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey
from mesh.hbone.splice import End, PlainEnd, open_end, relay_ends
from nodeagent.proxy.context import PodContext, local_of, original_destination, peer_of
from nodeagent.proxy.errors import UPSTREAM_ERRORS, NoHealthyUpstream, SelfCall, upstream_error
from nodeagent.proxy.outcome import OutcomeRecorder
from nodeagent.proxy.routing import Route, RouteKind, decide


async def handle(ctx: PodContext, client: PlainEnd) -> None:
    transport = client.transport
    assert transport is not None
    src = peer_of(transport)
    local = local_of(transport)
    dst_ip, dst_port = original_destination(ctx, transport)
    source = ctx.workload()
    route = decide(ctx.parts.state, source, dst_ip, dst_port, pod_ip=ctx.pod.ip, arrived_at=local)
    with OutcomeRecorder.of(ctx).outbound(src, (dst_ip, dst_port), source, route) as outcome:
        upstream = await _connect(ctx, route, src, outcome.traceparent)
        outcome.relayed(await relay_ends(client, upstream, outcome.bytes))


async def _connect(ctx: PodContext, route: Route, src: tuple[str, int], traceparent: str | None = None) -> End:
    """The upstream the route names; a route that goes nowhere, or a connection that fails, is raised as
    the `ProxyError` that says how (and the pod's proxy then closes the client)."""
    if route.kind is RouteKind.SELF_CALL:
        raise SelfCall(route.reason)
    if route.kind is RouteKind.REFUSE:
        raise NoHealthyUpstream(route.reason)
    try:
        return await (_hbone(ctx, route, src, traceparent) if route.tunnelled else _plain(ctx, route))
    except UPSTREAM_ERRORS as exc:
        raise upstream_error(exc) from exc


async def _hbone(ctx: PodContext, route: Route, src: tuple[str, int], traceparent: str | None) -> End:
    assert route.next_hop is not None and route.expected
    engine = ctx.parts.engine
    assert engine is not None
    await ctx.certificate(engine)  # held after the first connection: no hop to trio
    key = PoolKey(source=ctx.pod.identity, destination=route.expected[0], address=route.next_hop,
                  origin=ctx.pod.netns)
    headers = request_headers(forwarded_for=f"{src[0]}:{src[1]}",
                              service_host=route.service.hostname if route.service else None,
                              traceparent=traceparent)
    return await ctx.parts.pool.open_tunnel(key, route.authority, headers)


async def _plain(ctx: PodContext, route: Route) -> End:
    assert route.next_hop is not None
    return await open_end(await ctx.connect_from_pod(route.next_hop))
