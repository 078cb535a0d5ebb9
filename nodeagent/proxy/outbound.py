"""Outbound (15001): what a pod's application sends, captured by its redirect rules.

Decide, then do (STYLE.md 2): the original destination goes through `routing.decide`, and the `Route`
it returns is carried out by one function per kind: HBONE to the destination's node agent or to a
waypoint (from inside the pod's namespace, with the pod's certificate, expecting the destination's
identity), plain TCP to a destination outside the mesh, or a refusal.  Whatever happens is recorded
once, by the connection's `ConnectionOutcome`.  It all runs on the engine (`mesh.hbone.engine`): the
client is a `PlainEnd` whose bytes wait (kept, not read further than a first chunk) for the upstream;
to another node agent they also go ahead, right after the CONNECT (early data, see `_connect`).

Pre-warm: when a pod is enrolled, `prewarm` opens, ahead of its first connection, the pooled HBONE
connection that its first connection to each service of its own namespace would need (the routes
`decide` gives for the service's first address and port, at most `PREWARM_MAX` distinct pool keys, a
destination not reachable yet tried again `PREWARM_ATTEMPTS` times), so that first connection does not
wait for a TCP and TLS handshake.  The connections are pooled as any other and close after the pool's
idle timeout when no tunnel uses them.
"""

from __future__ import annotations

import asyncio
import json
import logging

from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey
from mesh.hbone.splice import End, PlainEnd, open_end, relay_ends
from mesh.proto import discovery_pb2 as pb
from nodeagent.dns.upstream import UpstreamError
from nodeagent.pods.source import PodRef
from nodeagent.proxy.context import PodContext, local_of, original_destination, peer_of
from nodeagent.proxy.errors import UPSTREAM_ERRORS, NoHealthyUpstream, SelfCall, upstream_error
from nodeagent.proxy.outcome import OutcomeRecorder
from nodeagent.proxy.routing import Route, RouteKind, decide
from nodeagent.state import MeshState

log = logging.getLogger("nodeagent.proxy")

PREWARM_MAX = 8  # pooled connections a pod's enrollment opens ahead of time, at most
PREWARM_ATTEMPTS = 5  # tries for a destination that cannot be reached yet ...
PREWARM_RETRY = 1.0  # ... this many seconds apart


async def handle(ctx: PodContext, client: PlainEnd) -> None:
    transport = client.transport
    assert transport is not None
    src = peer_of(transport)
    local = local_of(transport)
    dst_ip, dst_port = original_destination(ctx, transport)
    source = ctx.workload()
    route = decide(ctx.parts.state, source, dst_ip, dst_port, pod_ip=ctx.pod.ip, arrived_at=local)
    with OutcomeRecorder.of(ctx).outbound(src, (dst_ip, dst_port), source, route) as outcome:
        upstream = await _connect(ctx, route, src, outcome.traceparent, client)
        outcome.relayed(await relay_ends(client, upstream, outcome.bytes))


async def _connect(ctx: PodContext, route: Route, src: tuple[str, int], traceparent: str | None = None,
                   client: PlainEnd | None = None) -> End:
    """The upstream the route names; a route that goes nowhere, or a connection that fails, is raised as
    the `ProxyError` that says how (and the pod's proxy then closes the client).  The `client`'s first
    bytes go with the CONNECT to a node agent (early data: its 15008 holds them until it is connected to
    the application, and drops them if it refuses); a waypoint gets them after its answer."""
    if route.kind is RouteKind.SELF_CALL:
        raise SelfCall(route.reason)
    if route.kind is RouteKind.REFUSE:
        raise NoHealthyUpstream(route.reason)
    try:
        if route.tunnelled:
            return await _hbone(ctx, route, src, traceparent, client if route.kind is RouteKind.HBONE else None)
        return await _plain(ctx, route)
    except UPSTREAM_ERRORS as exc:
        raise upstream_error(exc) from exc


async def _hbone(ctx: PodContext, route: Route, src: tuple[str, int], traceparent: str | None,
                 ahead: PlainEnd | None = None) -> End:
    assert route.next_hop is not None and route.expected
    engine = ctx.parts.engine
    assert engine is not None
    await ctx.certificate(engine)  # held after the first connection: no hop to trio
    key = pool_key(ctx.pod, route)
    headers = request_headers(forwarded_for=f"{src[0]}:{src[1]}",
                              service_host=route.service.hostname if route.service else None,
                              traceparent=traceparent)
    return await ctx.parts.pool.open_tunnel(key, route.authority, headers, ahead)


def pool_key(pod: PodRef, route: Route) -> PoolKey:
    """The pooled connections a tunnelled route of this pod may share."""
    assert route.next_hop is not None and route.expected
    return PoolKey(source=pod.identity, destination=route.expected[0], address=route.next_hop, origin=pod.netns)


def prewarm_keys(view: MeshState, pod: PodRef, source: pb.Workload | None) -> list[PoolKey]:
    """The pool keys of the tunnelled routes the pod's first connection to each service of its own
    namespace would take, but to itself (services in hostname order, at most `PREWARM_MAX` keys)."""
    keys: list[PoolKey] = []
    services = sorted((s for s in view.services() if s.namespace == pod.namespace), key=lambda s: s.hostname)
    for svc in services:
        if not svc.vips or not svc.ports:
            continue
        route = decide(view, source, svc.vips[0], svc.ports[0].service_port, pod_ip=pod.ip)
        if route.tunnelled and route.next_hop is not None and route.expected and route.next_hop[0] != pod.ip:
            key = pool_key(pod, route)
            if key not in keys:
                keys.append(key)
        if len(keys) >= PREWARM_MAX:
            break
    return keys


async def prewarm(ctx: PodContext) -> int:
    """(On the engine.)  Open the pod's likely first pooled connections (`prewarm_keys`); how many were
    dialled.  A destination that cannot be reached now is left to the first connection that needs it."""
    engine = ctx.parts.engine
    assert engine is not None
    keys = prewarm_keys(ctx.parts.state, ctx.pod, ctx.workload())
    dialled = 0
    try:
        if keys:
            await ctx.certificate(engine)
    except UPSTREAM_ERRORS as exc:
        log.debug("not pre-warming for pod %s: %s", ctx.pod.key, exc)
        return 0
    last_error = ""
    for attempt in range(PREWARM_ATTEMPTS):
        if attempt:
            await asyncio.sleep(PREWARM_RETRY)  # the peer's pod may be being enrolled at the same time
        failed = []
        for key in keys:
            try:
                dialled += await ctx.parts.pool.warm(key)
            except UPSTREAM_ERRORS as exc:
                failed.append(key)
                last_error = f"{key.describe()}: {exc}"
        keys = failed
        if not keys:
            break
    log.info('{"event": "prewarmed", "pod": %s, "dialled": %d, "unreachable": %d, "attempts": %d, "last_error": %s}',
             json.dumps(ctx.pod.key), dialled, len(keys), attempt + 1, json.dumps(last_error))
    return dialled


async def _plain(ctx: PodContext, route: Route) -> End:
    hop = await _resolved(ctx, route) if route.resolve else route.next_hop
    assert hop is not None
    return await open_end(await ctx.connect_from_pod(hop))


async def _resolved(ctx: PodContext, route: Route) -> tuple[str, int]:
    """Where a route to a name goes (a DNS ServiceEntry's endpoint): its first address, as the agent's
    resolver (`nodeagent.dns.upstream.Resolver`, in trio) finds it now."""
    resolver, engine = ctx.parts.resolver, ctx.parts.engine
    if resolver is None or engine is None:
        raise NoHealthyUpstream(f"{route.resolve} must be resolved, and the agent has no resolver")
    try:
        addresses = await engine.from_trio(resolver.resolve, route.resolve)
    except UpstreamError as exc:
        raise NoHealthyUpstream(f"cannot resolve {route.resolve}: {exc}") from None
    return addresses[0], route.resolve_port
