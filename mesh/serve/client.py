"""The client of the processes' HTTP endpoints: HTTP/1.1 over a Unix socket, or over TCP from inside a
named network namespace (an agent's admin port is on the loopback of its node's namespace).

    get(Endpoint.unix(home / "debug.sock"), "/debug/connections").json()
    get(Endpoint.tcp("127.0.0.1", 15000, netns="amb.demo.node.node-1"), "/workloads")
    post_json(Endpoint.unix(home / "api.sock"), "/apply", {"documents": [...]})

Blocking (for CLIs, tests and the local cluster).  Errors: `Unreachable` when no connection could be
made, `NoAnswer` when one was made but no complete answer came, `mesh.netns.NetnsError` when the
namespace cannot be entered.  Any status is a `Reply`; what a status means is the caller's business.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh import netns
from mesh.serve.errors import NoAnswer, Unreachable

TIMEOUT = 5.0


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: a Unix socket path, or host:port (seen from network namespace `netns`)."""

    host: str = ""
    port: int = 0
    path: str = ""
    netns: str | None = None

    @classmethod
    def unix(cls, path: Path | str) -> Endpoint:
        return cls(path=str(path))

    @classmethod
    def tcp(cls, host: str, port: int, netns: str | None = None) -> Endpoint:
        return cls(host=host, port=port, netns=netns)

    def __str__(self) -> str:
        if self.path:
            return self.path
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return where + (f" in {self.netns}" if self.netns else "")

    def connect(self, timeout: float) -> socket.socket:
        """A connected socket; OSError if nothing answers, NetnsError if the namespace cannot be entered."""
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
            return sock
        if self.netns is None:
            return socket.create_connection((self.host, self.port), timeout)
        with netns.entered(self.netns):  # the socket is made in the namespace and stays there
            return socket.create_connection((self.host, self.port), timeout)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = ""

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not."""
        return json.loads(self.body)


class _Connection(http.client.HTTPConnection):
    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        super().__init__(endpoint.host or "localhost", endpoint.port or None, timeout=timeout)
        self._endpoint = endpoint
        self._timeout = timeout

    def connect(self) -> None:
        self.sock = self._endpoint.connect(self._timeout)


def request(endpoint: Endpoint, method: str, path: str, body: bytes | None = None, *,
            headers: Mapping[str, str] | None = None, timeout: float = TIMEOUT) -> Reply:
    conn = _Connection(endpoint, timeout)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise Unreachable(str(endpoint), exc) from exc
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Reply(resp.status, resp.read(), resp.getheader("content-type") or "")
        except (OSError, http.client.HTTPException) as exc:
            raise NoAnswer(str(endpoint), exc) from exc
    finally:
        conn.close()


def get(endpoint: Endpoint, path: str, *, timeout: float = TIMEOUT) -> Reply:
    return request(endpoint, "GET", path, timeout=timeout)


def post_json(endpoint: Endpoint, path: str, obj: object, *, timeout: float = TIMEOUT) -> Reply:
    return request(endpoint, "POST", path, json.dumps(obj).encode(), headers={"content-type": "application/json"},
                   timeout=timeout)
