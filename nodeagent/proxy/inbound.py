"""Inbound: HBONE on 15008 (mutual TLS) and plaintext on 15006, both in the destination pod's namespace.

HBONE: TLS 1.3 with the pod's certificate, a client certificate of the trust domain required; then each
CONNECT is decided as a value (`admission.decide`: this pod's address? this pod known? L4 authorization
with the client's verified identity) before any answer: refused with 400, 503 or 401, or admitted, when
the agent connects to the application from the client's address (503 when it refuses), answers 200 and
relays.  Bytes the client sent after its CONNECT (early data) wait in the tunnel until then: a refused
CONNECT drops them, and nothing reaches the application.  A CONNECT the client resets before its answer cancels this (`mesh.hbone.aio`); each pod's
15008 caps its connections and TLS handshakes (`PodContext.hbone_gate`).  Plaintext (from
clients outside the mesh): the same decision with no identity, so a STRICT PeerAuthentication (a DENY of
connections without a principal) refuses it.  Each connection's outcome is recorded once.  While it
relays, an admitted connection is remembered (`AgentParts.admitted`): an authorization update decides it
again and closes it if now refused (`recheck`).  It all runs on the engine (`mesh.hbone.engine`).
"""

from __future__ import annotations

import logging
import socket

from mesh.hbone.aio import AioAcceptor, AioServerConnection, serve_tls
from mesh.hbone.errors import HboneError, ListenerFull
from mesh.hbone.server import InboundRequest
from mesh.hbone.splice import PlainEnd, open_end, relay_ends
from mesh.secrets.errors import SecretsError
from nodeagent.metrics import FailureReason
from nodeagent.proxy import admission, recheck
from nodeagent.proxy.admission import Admit, InboundConnection, Refusal
from nodeagent.proxy.context import PodContext, original_destination, peer_of
from nodeagent.proxy.errors import UPSTREAM_ERRORS, upstream_error
from nodeagent.proxy.outcome import OutcomeRecorder

log = logging.getLogger("nodeagent.inbound")

HANDSHAKE_TIMEOUT = 10.0
Downstream = AioAcceptor | PlainEnd  # a CONNECT to answer, or a plaintext client


async def handle_hbone(ctx: PodContext, sock: socket.socket) -> AioServerConnection | None:
    """One TCP connection from another agent (or a waypoint), just accepted: TLS, then many CONNECT
    streams, each served by `_tunnel` in a task of its own.  The connection, once it runs."""
    engine = ctx.parts.engine
    assert engine is not None
    try:
        await ctx.certificate(engine)
        tls = ctx.parts.certs.server_context(ctx.pod.identity)
    except SecretsError as exc:
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.NO_CERTIFICATE)
        log.warning("inbound HBONE to %s refused: no certificate yet: %s", ctx.pod.key, exc)
        sock.close()
        return None
    try:
        return await serve_tls(sock, tls, lambda request, acceptor: _tunnel(ctx, request, acceptor),
                               trust_domain=ctx.parts.trust_domain, gate=ctx.hbone_gate, timeout=HANDSHAKE_TIMEOUT)
    except ListenerFull as exc:  # counted; not logged one by one, a flood would flood the log too
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.LISTENER_FULL)
        log.debug("inbound HBONE to %s: %s", ctx.pod.key, exc)
    except HboneError as exc:
        ctx.parts.metrics.agent.connection_failed("inbound", FailureReason.TLS_HANDSHAKE)
        log.info("inbound HBONE connection to %s ended: %s", ctx.pod.key, exc)
    return None


async def _tunnel(ctx: PodContext, request: InboundRequest, acceptor: AioAcceptor) -> None:
    await _serve(ctx, admission.from_connect(request), acceptor)


async def handle_plaintext(ctx: PodContext, client: PlainEnd) -> None:
    """A connection from outside the mesh, redirected to 15006 by the pod's rules."""
    transport = client.transport
    assert transport is not None
    host, port = original_destination(ctx, transport)
    await _serve(ctx, admission.plaintext(ctx.pod, peer_of(transport), port, host=host), client)


async def _serve(ctx: PodContext, conn: InboundConnection, downstream: Downstream) -> None:
    """Decide, then answer and forward: the part both inbound paths share."""
    view, admitted = ctx.parts.state, ctx.parts.admitted
    decided_at = admitted.generation
    verdict = admission.decide(view, ctx.pod, conn)
    source = view.workload_by_address(conn.source_ip)
    with OutcomeRecorder.of(ctx).inbound(conn, verdict, source, ctx.workload()) as outcome:
        if isinstance(verdict, Refusal):
            outcome.refused(verdict)
            _refuse(downstream, verdict.status, verdict.reason)
            return
        app = await _connect_app(ctx, verdict, downstream)
        try:  # the application's connection is closed too when the client is gone before its answer
            client = downstream.accept() if isinstance(downstream, AioAcceptor) else downstream
        except BaseException:
            app.abort()
            raise
        with admitted.holding(ctx.pod, conn, client, app) as held:  # decided again on policy updates
            if admitted.generation != decided_at:  # a pass ran while it connected, without it
                recheck.decide_again(view, held)
            copied = await relay_ends(client, app, outcome.bytes)
        if held.closed_by is not None:  # a policy update refused it: closed (`recheck`)
            outcome.refused(held.closed_by)
        else:
            outcome.relayed(copied)


async def _connect_app(ctx: PodContext, verdict: Admit, downstream: Downstream) -> PlainEnd:
    """The application's connection, from the client's address; a failure is answered to the client
    (503) and raised."""
    address = verdict.address
    try:
        return await open_end(await ctx.connect_from_pod(address, source=verdict.source))
    except UPSTREAM_ERRORS as exc:
        error = upstream_error(exc, f"connection to the application on port {address[1]} failed")
        _refuse(downstream, error.status, str(error))
        raise error from exc


def _refuse(downstream: Downstream, status: int, reason: str) -> None:
    if isinstance(downstream, AioAcceptor):
        downstream.reject(status, reason)
    else:
        downstream.abort()
