"""Errors of the HTTP stack: a server that cannot listen, a request that got no answer."""

from __future__ import annotations

from mesh.errors import MeshError


class ServeError(MeshError):
    """Something went wrong serving or asking one of the processes' HTTP endpoints."""


class ListenError(ServeError):
    """An endpoint cannot listen on its address (in use, no permission, no such directory)."""


class HttpClientError(ServeError):
    """A request to an endpoint failed; `where` names the endpoint."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


class Unreachable(HttpClientError):
    """No connection could be made: nothing listens there, or the socket file does not exist."""

    def __init__(self, where: str, cause: OSError) -> None:
        self.errno = cause.errno
        self.strerror = cause.strerror or str(cause)
        super().__init__(where, f"cannot connect to {where}: {self.strerror}")


class NoAnswer(HttpClientError):
    """The connection was made but no complete HTTP answer came back (timeout, reset, not HTTP)."""

    def __init__(self, where: str, cause: Exception) -> None:
        super().__init__(where, f"{where} did not answer: {cause or type(cause).__name__}")
