"""Inbound: HBONE on 15008 (mutual TLS) and plaintext on 15006, both in the destination pod's namespace.

HBONE: TLS 1.3 with the pod's certificate, a client certificate of the trust domain required; each
CONNECT must name this pod's address; L4 authorization decides with the client's verified identity
(401 when denied); then the agent connects to the application (503 when it refuses) and relays.
Plaintext (from clients outside the mesh): the same authorization with no identity, so a STRICT
PeerAuthentication (a DENY of connections without a principal) refuses it.
"""

from __future__ import annotations

import logging

import trio

from mesh.hbone.errors import HboneError
from mesh.hbone.relay import relay
from mesh.hbone.server import InboundRequest, TunnelAcceptor, serve_hbone
from mesh.identity import SpiffeId
from mesh.secrets.errors import SecretsError
from nodeagent.accesslog import INBOUND, RESULT_OK, AccessLogEntry, decision_fields, result_upstream_failed
from nodeagent.metrics import FailureReason, Reporter, ResponseFlag, tcp_labels
from nodeagent.proxy import authz
from nodeagent.proxy.context import SOCKET_ERRORS, Clock, PodContext, peer_of, workload_peer

log = logging.getLogger("nodeagent.inbound")


async def handle_hbone(ctx: PodContext, stream: trio.SocketStream) -> None:
    """One TLS connection from another agent (or a waypoint): many CONNECT streams."""
    try:
        await ctx.parts.certs.get(ctx.pod.identity)
    except SecretsError as exc:
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.NO_CERTIFICATE)
        log.warning("inbound HBONE to %s refused: no certificate yet: %s", ctx.pod.key, exc)
        await stream.aclose()
        return
    tls: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(stream, ctx.parts.certs.server_context(ctx.pod.identity), server_side=True)
    try:
        await serve_hbone(tls, lambda request, acceptor: _tunnel(ctx, request, acceptor),
                          trust_domain=ctx.parts.trust_domain)
    except HboneError as exc:
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.TLS_HANDSHAKE)
        log.info("inbound HBONE connection to %s from %s ended: %s", ctx.pod.key, peer_of(stream)[0], exc)
    except SOCKET_ERRORS:
        pass
    finally:
        await trio.aclose_forcefully(tls)


async def _tunnel(ctx: PodContext, request: InboundRequest, acceptor: TunnelAcceptor) -> None:
    clock = Clock()
    # Authorize on the connection's own peer address (HBONE leaves the source pod with its address);
    # `Forwarded` is the client's word, good for the log's port but never for an ipBlocks decision.
    src_ip = request.peer_address.rpartition(":")[0].strip("[]")
    fwd_ip, _, fwd_port = (request.forwarded_for or "").rpartition(":")
    src_port = fwd_port if fwd_ip.strip("[]") == src_ip else ""
    port = request.authority.port
    if request.authority.host != ctx.pod.ip:
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.BAD_REQUEST)
        await acceptor.reject(400, f"{request.authority} is not this pod ({ctx.pod.ip})")
        return
    await _serve(ctx, clock, src_ip, int(src_port) if src_port.isdigit() else 0, request.peer, port, acceptor)


async def handle_plaintext(ctx: PodContext, client: trio.SocketStream) -> None:
    """A connection from outside the mesh, redirected to 15006 by the pod's rules."""
    clock = Clock()
    src_ip, src_port = peer_of(client)
    _, port = ctx.parts.redirector.original_destination(client.socket)  # type: ignore[arg-type]
    await _serve(ctx, clock, src_ip, src_port, None, port, client)


async def _serve(ctx: PodContext, clock: Clock, src_ip: str, src_port: int, peer: SpiffeId | None, port: int,
                 downstream: TunnelAcceptor | trio.SocketStream) -> None:
    """Authorize, connect to the application, answer, relay: the part both inbound paths share."""
    destination = ctx.workload()
    source = ctx.parts.state.workload_by_address(src_ip)
    mtls = peer is not None
    labels = tcp_labels(Reporter.DESTINATION, source=source, source_principal=peer, destination=destination,
                        destination_principal=ctx.pod.identity, mutual_tls=mtls)
    conn = ctx.parts.metrics.tcp.open(labels)
    decision = None
    result, flags, error = RESULT_OK, None, ""
    try:
        if destination is None:
            result, flags, error = "503", ResponseFlag.NO_ROUTE, "this pod is no longer known to the agent"
            await _refuse(downstream, 503, error)
            return
        decision = authz.evaluate(authz.ConnectionInfo(peer, src_ip, destination, ctx.pod.ip, port),
                                  ctx.parts.state.policies_for(destination))
        if not decision.allowed:
            result, flags, error = decision.result(), ResponseFlag.DENIED, decision.reason
            ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.DENIED)
            await _refuse(downstream, 401, decision.reason)
            return
        try:
            app = await ctx.connect_from_pod((ctx.pod.ip, port))
        except (TimeoutError, *SOCKET_ERRORS) as exc:
            result, flags, error = result_upstream_failed(str(exc)), ResponseFlag.UPSTREAM_CONNECT_FAILURE, str(exc)
            ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.UPSTREAM_REFUSED)
            await _refuse(downstream, 503, f"connection to the application on port {port} failed: {exc}")
            return
        client = await downstream.accept() if isinstance(downstream, TunnelAcceptor) else downstream
        copied = await relay(client, app)
        conn.add_received(copied.a_to_b)
        conn.add_sent(copied.b_to_a)
        error = copied.error or ""
    finally:
        conn.close(flags)
        fields = {**(decision_fields(decision) if decision is not None else {}), "result": result}
        ctx.parts.log.write(AccessLogEntry(
            direction=INBOUND, start=clock.start, duration=clock.elapsed(),
            source=workload_peer(src_ip, src_port, source, str(peer) if peer else ""),
            destination=workload_peer(ctx.pod.ip, port, destination, str(ctx.pod.identity)),
            bytes_sent=conn.sent, bytes_received=conn.received,
            connection_security_policy="mutual_tls" if mtls else "none", error=error, **fields))


async def _refuse(downstream: TunnelAcceptor | trio.SocketStream, status: int, reason: str) -> None:
    if isinstance(downstream, TunnelAcceptor):
        await downstream.reject(status, reason)
    else:
        await trio.aclose_forcefully(downstream)
