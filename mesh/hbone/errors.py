"""Errors of the HBONE tunnel: protocol core, trio transport and connection pool.

Every error is an `HboneError` (a `MeshError`); its message says what went wrong and, where it can,
what to look at.  Tunnel-level failures that generic stream code expects as trio exceptions
(`trio.BrokenResourceError`) are raised as `TunnelReset`, which is both.
"""

from __future__ import annotations

import trio

from mesh.errors import MeshError


class HboneError(MeshError):
    """Something went wrong with an HBONE connection or tunnel."""


class ProtocolUsageError(HboneError):
    """The caller asked the protocol core for something its state does not allow (a bug in the caller)."""


class InvalidAuthorityError(HboneError):
    """A CONNECT target that is not `host:port`."""


class HeaderListTooLargeError(HboneError):
    """Request headers larger than the peer (or this side) accepts."""


class ConnectionNotUsableError(HboneError):
    """The connection is draining (GOAWAY) or closed: open the tunnel on another connection."""


class StreamLimitError(HboneError):
    """The peer's limit of concurrent streams is reached on this connection."""


class TunnelRejected(HboneError):
    """The HBONE server answered the CONNECT with a non-2xx status."""

    def __init__(self, authority: str, status: int, reason: str) -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"CONNECT {authority} refused with {status}{detail}")
        self.authority = authority
        self.status = status
        self.reason = reason


class TunnelTimeout(HboneError, TimeoutError):
    """The HBONE server did not answer a CONNECT in time (the stream was reset)."""


class ListenerFull(HboneError):
    """A listener took a connection over its cap (`ListenerLimits`): it was closed at once."""


class TunnelReset(HboneError, trio.BrokenResourceError):
    """The tunnel's stream was reset (by the peer, or because its connection failed)."""


class HandshakeError(HboneError):
    """TLS handshake failed, or the peer did not negotiate ALPN h2, or presented an unacceptable identity."""


class PoolConnectError(HboneError):
    """A new pooled connection could not be made."""
