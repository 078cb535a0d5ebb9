"""Errors of the waypoint: configuration, HTTP parsing, upstream failures, token checks.

Every error is a `WaypointError` (a `MeshError`); messages say what is wrong and what to look at.
"""

from __future__ import annotations

import trio

from mesh.errors import MeshError

# A peer that went: its stream broken (reset, or a TLS record cut short) or already closed.  Code that
# serves one connection ends it quietly on these; trio's nurseries report them in groups (`except*`).
STREAM_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class WaypointError(MeshError):
    """Something went wrong in the waypoint."""


class ConfigError(WaypointError):
    """A configuration resource the waypoint cannot apply (the xDS handler NACKs the update)."""

    def __init__(self, resource: str, message: str) -> None:
        super().__init__(f"{resource}: {message}")
        self.resource = resource
        self.detail = message


class HttpError(WaypointError):
    """Bad HTTP from the client; `status` is what to answer (400, 408, 431) before closing."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UpstreamError(WaypointError):
    """Forwarding to an endpoint failed; `flag` is the access-log response flag that names why."""

    flag = "UF"
    retry_on = "connect-failure"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ConnectFailure(UpstreamError):
    """The endpoint could not be reached (refused, unreachable, connect timeout)."""

    flag = "UF"
    retry_on = "connect-failure"


class UpstreamReset(UpstreamError):
    """The endpoint closed (UC) or reset (UR) the connection or stream before the response was complete."""

    flag = "UC"
    retry_on = "reset"

    def __init__(self, message: str, flag: str = "UC") -> None:
        super().__init__(message)
        self.flag = flag


class RefusedStream(UpstreamError):
    """The endpoint refused the HTTP/2 stream (REFUSED_STREAM): safe to retry."""

    flag = "UR"
    retry_on = "refused-stream"


class JwksError(WaypointError):
    """A JSON Web Key Set could not be fetched or parsed."""

