"""Routing without sockets: a `Request` value in, a `Response` value out.

    router = Router()
    router.add("/workloads", lambda request: Response.json({...}))
    router.add("/apply", apply, methods=("POST",))
    router(Request.parse("GET", "/workloads?all=1"))        # -> Response(200, b"...", "application/json")

A `Router` is a table of path -> method -> handler and is itself a handler, so routers nest
(`include`).  A path it does not know is answered 404 with the list of its paths, a method a path does
not take 405 (and the connection is closed, as for any request the server refuses); HEAD is served by
the GET handler (the server leaves the body out).  Errors are plain text unless the router is given
another `error` answer (the apply API answers JSON).  Everything here is pure and tested without sockets.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    local: bool = True  # from a Unix socket or a loopback address

    @classmethod
    def parse(cls, method: str, target: str, *, body: bytes = b"", headers: Iterable[tuple[str, str]] = (),
              local: bool = True) -> Request:
        """From the request line's method and target; the last value of a repeated query parameter wins."""
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        return cls(method.upper(), parts.path or "/", query, body, tuple(headers), local)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        """The body as JSON (an empty body is `{}`); ValueError if it is not JSON."""
        return json.loads(self.body) if self.body else {}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this answer

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, (text.rstrip("\n") + "\n").encode())

    @classmethod
    def json(cls, obj: object, status: int = 200) -> Response:
        return cls(status, (json.dumps(obj, indent=1, default=str) + "\n").encode(), JSON)


Handler = Callable[[Request], Response]
ErrorAnswer = Callable[[str, int], Response]  # (message, status) -> the answer


def json_error(message: str, status: int) -> Response:
    """An error as JSON: `error` (one line) and `errors` (all lines)."""
    return Response.json({"error": message, "errors": [message]}, status)


def plain(item: object) -> object:
    """A status value (a dataclass, a mapping or anything else) as JSON-ready data."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    return {"value": str(item)}


class Router:
    """A table of path -> method -> handler; itself a `Handler`."""

    def __init__(self, routes: Mapping[str, Handler] | None = None, *, error: ErrorAnswer = Response.text) -> None:
        self._table: dict[str, dict[str, Handler]] = {}
        self._error = error
        for path, handler in (routes or {}).items():
            self.add(path, handler)

    def add(self, path: str, handler: Handler, methods: Iterable[str] = ("GET",)) -> Router:
        by_method = self._table.setdefault(path.rstrip("/") or "/", {})
        for method in methods:
            by_method[method.upper()] = handler
        return self

    def include(self, other: Router) -> Router:
        """Serve `other`'s routes too (its error answer is not taken over)."""
        for path, by_method in other._table.items():
            self._table.setdefault(path, {}).update(by_method)
        return self

    @property
    def paths(self) -> list[str]:
        return list(self._table)

    def __call__(self, request: Request) -> Response:
        by_method = self._table.get(request.path.rstrip("/") or "/")
        if by_method is None:
            return self._error(f"no endpoint {request.path}: try {', '.join(self._table)}", 404)
        handler = by_method.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allowed = ", ".join(by_method)
            answer = self._error(f"method {request.method} not allowed on {request.path}: use {allowed}", 405)
            return dataclasses.replace(answer, headers=(("allow", allowed),), close=True)
        return handler(request)
