"""HBONE's TLS handshakes on the trio side, with their identity checks.

`client_handshake` requires the server to present one of the expected SPIFFE identities;
`server_handshake` requires the client to be in the mesh's trust domain.  Both require ALPN h2 and close
the stream when anything fails.  They work on a `mesh.hbone.tlssocket.TlsSocket` (TLS on the TCP socket
itself) or on a `trio.SSLStream`; `mesh.hbone.client` and `mesh.hbone.server` call them before handing
the connection to the driver in `mesh.hbone.transport`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeAlias

import trio

from mesh.hbone.errors import HandshakeError
from mesh.hbone.tlssocket import TlsSocket
from mesh.identity import SpiffeId
from mesh.secrets.errors import PeerIdentityError
from mesh.secrets.tls import ALPN_H2, check_peer

TlsStream: TypeAlias = TlsSocket | trio.SSLStream[Any]


def _peer_name(stream: object) -> str:
    if isinstance(stream, TlsSocket):
        return stream.name
    sock = getattr(getattr(stream, "transport_stream", None), "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _close_now(stream: TlsStream) -> None:
    if isinstance(stream, TlsSocket):
        stream.close()
    else:
        await trio.aclose_forcefully(stream)


async def _handshake(stream: TlsStream, timeout: float,
                     slots: trio.CapacityLimiter | None = None) -> None:
    try:
        with trio.fail_after(timeout):  # waiting for a slot counts: a full listener answers late or never
            if slots is None:
                await stream.do_handshake()
            else:
                async with slots:
                    await stream.do_handshake()
    except trio.TooSlowError:
        raise HandshakeError(f"TLS handshake with {_peer_name(stream)} took over {timeout:g}s") from None
    except (trio.BrokenResourceError, OSError) as exc:  # ssl.SSLError is an OSError
        cause = exc.__cause__ or exc
        raise HandshakeError(
            f"TLS handshake with {_peer_name(stream)} failed ({cause}): do both sides hold certificates "
            "from the same mesh root?"
        ) from None
    if stream.selected_alpn_protocol() != ALPN_H2:
        raise HandshakeError(f"{_peer_name(stream)} did not negotiate ALPN h2: it is not an HBONE endpoint")


async def client_handshake(
    stream: TlsStream, expected: Collection[SpiffeId], *, timeout: float = 10.0
) -> SpiffeId:
    """TLS handshake as the client; the server must present one of `expected`.  Closes `stream` on failure."""
    try:
        await _handshake(stream, timeout)
        try:
            return check_peer(stream, allowed=expected)
        except PeerIdentityError as exc:
            raise HandshakeError(
                f"HBONE server {_peer_name(stream)}: {exc}; refusing to send traffic to it"
            ) from None
    except BaseException:
        await _close_now(stream)
        raise


async def server_handshake(
    stream: TlsStream, trust_domain: str | None, *, timeout: float = 10.0,
    slots: trio.CapacityLimiter | None = None,
) -> SpiffeId | None:
    """TLS handshake as the server; the client must be in `trust_domain` (None: do not check).
    `slots`: the listener's handshakes in progress (waiting for one is part of `timeout`).
    Closes `stream` on failure."""
    try:
        await _handshake(stream, timeout, slots)
        if trust_domain is None:
            return None
        try:
            return check_peer(stream, trust_domain=trust_domain)
        except PeerIdentityError as exc:
            raise HandshakeError(f"HBONE client {_peer_name(stream)}: {exc}") from None
    except BaseException:
        await _close_now(stream)
        raise

