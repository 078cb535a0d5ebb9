"""Inbound: HBONE on 15008 (mutual TLS) and plaintext on 15006, both in the destination pod's namespace.

HBONE: TLS 1.3 with the pod's certificate, a client certificate of the trust domain required; then each
CONNECT is decided as a value (`admission.decide`: this pod's address? this pod known? L4 authorization
with the client's verified identity) before any answer: refused with 400, 503 or 401, or admitted, when
the agent connects to the application from the client's address (503 when it refuses), answers 200 and
relays.  A CONNECT the client resets before its answer cancels this (`mesh.hbone.server`); each pod's
15008 caps its connections and TLS handshakes (`PodContext.hbone_gate`).  Plaintext (from
clients outside the mesh): the same decision with no identity, so a STRICT PeerAuthentication (a DENY of
connections without a principal) refuses it.  Each connection's outcome is recorded once.
"""

from __future__ import annotations

import logging

import trio

from mesh.hbone.errors import HboneError, ListenerFull
from mesh.hbone.relay import relay
from mesh.hbone.server import InboundRequest, TunnelAcceptor, serve_hbone
from mesh.secrets.errors import SecretsError
from nodeagent.metrics import FailureReason
from nodeagent.proxy import admission
from nodeagent.proxy.admission import Admit, InboundConnection, Refusal
from nodeagent.proxy.context import SOCKET_ERRORS, PodContext, original_destination, peer_of
from nodeagent.proxy.errors import UPSTREAM_ERRORS, upstream_error
from nodeagent.proxy.outcome import OutcomeRecorder

log = logging.getLogger("nodeagent.inbound")

Downstream = TunnelAcceptor | trio.SocketStream  # a CONNECT to answer, or a plaintext client


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
                          trust_domain=ctx.parts.trust_domain, gate=ctx.hbone_gate)
    except ListenerFull as exc:  # counted; not logged one by one, a flood would flood the log too
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.LISTENER_FULL)
        log.debug("inbound HBONE to %s: %s", ctx.pod.key, exc)
    except HboneError as exc:
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.TLS_HANDSHAKE)
        log.info("inbound HBONE connection to %s from %s ended: %s", ctx.pod.key, peer_of(stream)[0], exc)
    except SOCKET_ERRORS:
        pass
    finally:
        await trio.aclose_forcefully(tls)


async def _tunnel(ctx: PodContext, request: InboundRequest, acceptor: TunnelAcceptor) -> None:
    await _serve(ctx, admission.from_connect(request), acceptor)


async def handle_plaintext(ctx: PodContext, client: trio.SocketStream) -> None:
    """A connection from outside the mesh, redirected to 15006 by the pod's rules."""
    host, port = original_destination(ctx, client)
    await _serve(ctx, admission.plaintext(ctx.pod, peer_of(client), port, host=host), client)


async def _serve(ctx: PodContext, conn: InboundConnection, downstream: Downstream) -> None:
    """Decide, then answer and forward: the part both inbound paths share."""
    view = ctx.parts.state
    verdict = admission.decide(view, ctx.pod, conn)
    source = view.workload_by_address(conn.source_ip)
    with OutcomeRecorder.of(ctx).inbound(conn, verdict, source, ctx.workload()) as outcome:
        if isinstance(verdict, Refusal):
            outcome.refused(verdict)
            await _refuse(downstream, verdict.status, verdict.reason)
            return
        app = await _connect_app(ctx, verdict, downstream)
        async with app:  # closed too when the client is gone before its answer
            client = await downstream.accept() if isinstance(downstream, TunnelAcceptor) else downstream
            outcome.relayed(await relay(client, app, counter=outcome.bytes))


async def _connect_app(ctx: PodContext, verdict: Admit, downstream: Downstream) -> trio.abc.Stream:
    """The application's connection, from the client's address; a failure is answered to the client
    (503) and raised."""
    address = verdict.address
    try:
        return await ctx.connect_from_pod(address, source=verdict.source)
    except UPSTREAM_ERRORS as exc:
        error = upstream_error(exc, f"connection to the application on port {address[1]} failed")
        await _refuse(downstream, error.status, str(error))
        raise error from exc


async def _refuse(downstream: Downstream, status: int, reason: str) -> None:
    if isinstance(downstream, TunnelAcceptor):
        await downstream.reject(status, reason)
    else:
        await trio.aclose_forcefully(downstream)
