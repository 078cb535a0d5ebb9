"""Outbound (15001): what a pod's application sends, captured by its redirect rules.

Decide, then do (STYLE.md 2): the original destination goes through `routing.decide`, and the `Route`
it returns is carried out by one function per kind: HBONE to the destination's node agent or to a
waypoint (from inside the pod's namespace, with the pod's certificate, expecting the destination's
identity), plain TCP to a destination outside the mesh, or a refusal.
"""

from __future__ import annotations

import logging

import trio

from mesh.hbone.errors import HboneError, TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import PoolKey
from mesh.hbone.relay import relay
from mesh.secrets.errors import SecretsError
from nodeagent.accesslog import OUTBOUND, RESULT_OK, AccessLogEntry, result_upstream_failed
from nodeagent.metrics import FailureReason, Reporter, ResponseFlag, tcp_labels
from nodeagent.proxy.context import SOCKET_ERRORS, Clock, PodContext, peer_of, workload_peer
from nodeagent.proxy.routing import Route, RouteKind, decide

log = logging.getLogger("nodeagent.outbound")


async def handle(ctx: PodContext, client: trio.SocketStream) -> None:
    clock = Clock()
    src = peer_of(client)
    dst_ip, dst_port = ctx.parts.redirector.original_destination(client.socket)  # type: ignore[arg-type]
    source = ctx.workload()
    route = decide(ctx.parts.state, source, dst_ip, dst_port)
    via_hbone = route.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)
    labels = tcp_labels(Reporter.SOURCE, source=source, source_principal=ctx.pod.identity,
                        destination=route.workload,
                        destination_principal=route.expected[0] if route.expected else None,
                        service=route.service, mutual_tls=via_hbone)
    conn = ctx.parts.metrics.tcp.open(labels)
    result, flags, error = RESULT_OK, None, ""
    try:
        if route.kind is RouteKind.REFUSE:
            result, flags, error = result_upstream_failed(route.reason), ResponseFlag.NO_HEALTHY_UPSTREAM, route.reason
            ctx.parts.metrics.agent.connection_failed("outbound", FailureReason.NO_ENDPOINT)
            await client.aclose()
            return
        try:
            upstream = await (_hbone(ctx, route, src) if via_hbone else _plain(ctx, route))
        except TunnelRejected as exc:
            result, flags, error = str(exc.status), ResponseFlag.DENIED if exc.status == 401 else \
                ResponseFlag.UPSTREAM_CONNECT_FAILURE, str(exc)
            ctx.parts.metrics.agent.connection_failed(
                "outbound", FailureReason.DENIED if exc.status == 401 else FailureReason.UPSTREAM_REFUSED)
            await client.aclose()
            return
        except (HboneError, SecretsError, TimeoutError, *SOCKET_ERRORS) as exc:
            result, flags, error = result_upstream_failed(str(exc)), ResponseFlag.UPSTREAM_CONNECT_FAILURE, str(exc)
            reason = FailureReason.UPSTREAM_TIMEOUT if isinstance(exc, TimeoutError) else \
                FailureReason.NO_CERTIFICATE if isinstance(exc, SecretsError) else FailureReason.UPSTREAM_REFUSED
            ctx.parts.metrics.agent.connection_failed("outbound", reason)
            log.warning("outbound %s:%d -> %s (%s) failed: %s", src[0], src[1], route.authority, route.kind.value, exc)
            await client.aclose()
            return
        copied = await relay(client, upstream)
        conn.add_received(copied.a_to_b)
        conn.add_sent(copied.b_to_a)
        if copied.error:
            error = copied.error
    finally:
        conn.close(flags)
        dest = route.workload
        ctx.parts.log.write(AccessLogEntry(
            direction=OUTBOUND, start=clock.start, duration=clock.elapsed(),
            source=workload_peer(src[0], src[1], source, str(ctx.pod.identity)),
            destination=workload_peer(dst_ip, dst_port, dest, str(route.expected[0]) if route.expected else ""),
            result=result, destination_service=route.service.hostname if route.service else "",
            bytes_sent=conn.sent, bytes_received=conn.received,
            connection_security_policy="mutual_tls" if via_hbone else "none", error=error))


async def _hbone(ctx: PodContext, route: Route, src: tuple[str, int]) -> trio.abc.Stream:
    assert route.next_hop is not None and route.expected
    await ctx.parts.certs.get(ctx.pod.identity)  # cached after the first connection
    key = PoolKey(source=ctx.pod.identity, destination=route.expected[0], address=route.next_hop,
                  origin=ctx.pod.netns)
    headers = request_headers(forwarded_for=f"{src[0]}:{src[1]}",
                              service_host=route.service.hostname if route.service else None)
    return await ctx.parts.pool.open_tunnel(key, route.authority, headers)


async def _plain(ctx: PodContext, route: Route) -> trio.abc.Stream:
    assert route.next_hop is not None
    return await ctx.connect_from_pod(route.next_hop)
