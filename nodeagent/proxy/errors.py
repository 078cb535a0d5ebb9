"""Errors of the data path: each carries what its connection's outcome records.

As h2's exceptions carry their `error_code`, a `ProxyError` carries its response flag (`flag`), the
status its access-log `result` starts with (the HBONE answer it stands for), and the reason counted on
`mesh_agent_connection_failures_total` (`failure`).  `str(error)` is the short account that follows
the status in `result`; `detail` the full one for the log's `error`.  The proxies turn what their I/O
raises (socket, timeout, HBONE and certificate errors: `UPSTREAM_ERRORS`) into these at the one place
they connect, with `upstream_error()`.
"""

from __future__ import annotations

from mesh.hbone.errors import HboneError, TunnelRejected
from mesh.secrets.errors import SecretsError
from nodeagent.errors import NodeAgentError
from nodeagent.metrics import FailureReason, ResponseFlag
from nodeagent.proxy.context import SOCKET_ERRORS

UPSTREAM_ERRORS = (HboneError, SecretsError, TimeoutError, *SOCKET_ERRORS)


class ProxyError(NodeAgentError):
    """A connection the proxy could not carry."""

    flag = ResponseFlag.UPSTREAM_CONNECT_FAILURE
    status = 503
    failure = FailureReason.UPSTREAM_REFUSED

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class UpstreamConnectError(ProxyError):
    """The destination (its node agent, a waypoint, the application) refused or broke the connection."""


class UpstreamTimeout(ProxyError):
    failure = FailureReason.UPSTREAM_TIMEOUT


class NoCertificate(ProxyError):
    """The source pod has no certificate yet to present."""

    failure = FailureReason.NO_CERTIFICATE


class NoHealthyUpstream(ProxyError):
    """The route has nowhere to go: a service without a healthy endpoint, a waypoint without an instance."""

    flag = ResponseFlag.NO_HEALTHY_UPSTREAM
    failure = FailureReason.NO_ENDPOINT


class SelfCall(ProxyError):
    """The connection was addressed to the node agent itself (loopback, its own ports, the listener it
    arrived on): refused, as ztunnel refuses a SelfCall, instead of dialled back into the agent."""

    flag = ResponseFlag.NO_ROUTE
    status = 400
    failure = FailureReason.SELF_CALL


class TunnelRefused(ProxyError):
    """The next hop answered the CONNECT with `status` (401: its policy denied the connection)."""

    def __init__(self, rejected: TunnelRejected) -> None:
        super().__init__(rejected.reason or f"refused by {rejected.authority}", str(rejected))
        self.status = rejected.status
        denied = rejected.status == 401
        self.flag = ResponseFlag.DENIED if denied else ResponseFlag.UPSTREAM_CONNECT_FAILURE
        self.failure = FailureReason.DENIED if denied else FailureReason.UPSTREAM_REFUSED


def upstream_error(exc: Exception, context: str = "") -> ProxyError:
    """The `ProxyError` for what connecting upstream raised (one of `UPSTREAM_ERRORS`); `context` says
    what was being connected, for the log: "connection to the application on port 8080 failed"."""
    if isinstance(exc, TunnelRejected):
        return TunnelRefused(exc)
    what = str(exc) or type(exc).__name__
    message = f"{context}: {what}" if context else what
    if isinstance(exc, SecretsError):
        return NoCertificate(message)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(message)
    return UpstreamConnectError(message)
