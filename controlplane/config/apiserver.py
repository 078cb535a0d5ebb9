"""The apply API: HTTP/1.1 with JSON bodies on a Unix socket, in front of a `Store`.

    server = ApiServer(store, state_dir / "controlplane" / "api.sock")
    server.start()      # binds the socket (mode 0600) and serves in a daemon thread; returns at once
    ...
    server.stop()       # stops serving, joins the thread, removes the socket file
(or `with ApiServer(store, path): ...`, or `server.serve_forever()` to serve in the calling thread).

Endpoints (every response is a JSON object; errors carry `error` (one line) and `errors` (all lines)):
    GET  /healthz                         -> {"version": N}
    POST /apply   {"documents": [{"source", "index", "body"}], "namespace"?}
                                          -> {"version", "outcomes": [{"ref", "action", "text"}]}
    POST /delete  {"documents": [...]} or {"refs": ["Kind/ns/name"]}, "namespace"?, "ignoreNotFound"?
    GET  /resources?kind=K&namespace=NS&name=N   -> {"version", "items": [body, ...]}
    POST /label   {"ref": "Kind/ns/name", "set": {k: v}, "remove": [k]}
Status codes: 200 done, 400 malformed request, 404 not found, 409 conflict, 422 invalid configuration
(nothing was changed), 500 the store could not save.  Documents are validated here, authoritatively,
whatever the client checked before sending.  The client is `mesh.api.client.ApiClient`.

Every POST is logged as `api <path> status=.. version=.. errors=.. ms=..` and, when given,
`on_request(path, status, version, errors, ms)` is called (from the request's thread) for metrics.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from controlplane.config.store import Store, StoreError
from mesh.api.errors import ApiError, Conflict, NotFound, ValidationError
from mesh.api.kinds import DEFAULT_NAMESPACE, resolve_kind
from mesh.api.loader import documents_from_json
from mesh.api.validate import Ref

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024


class ApiServerError(ApiError):
    pass


class BadRequest(ApiError):
    pass


RequestHook = Callable[[str, int, "str | int", int, float], None]


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    store: Store
    on_request: RequestHook | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("api " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        route = {("GET", "/healthz"): self._healthz, ("GET", "/resources"): self._resources,
                 ("POST", "/apply"): self._apply, ("POST", "/delete"): self._delete,
                 ("POST", "/label"): self._label}.get((method, url.path))
        started = time.monotonic()
        try:
            if route is None:
                raise NotFound(f"no endpoint {method} {url.path}")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = self._read_json() if method == "POST" else {}
            status, reply = HTTPStatus.OK, route(query, body)
        except ValidationError as exc:
            status, reply = HTTPStatus.UNPROCESSABLE_ENTITY, _error(exc, exc.lines())
        except BadRequest as exc:
            status, reply = HTTPStatus.BAD_REQUEST, _error(exc)
        except NotFound as exc:
            status, reply = HTTPStatus.NOT_FOUND, _error(exc)
        except Conflict as exc:
            status, reply = HTTPStatus.CONFLICT, _error(exc)
        except (StoreError, ApiError) as exc:
            status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, _error(exc)
        except Exception as exc:  # never let a bug kill the connection without an answer
            log.exception("api %s %s failed", method, url.path)
            status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}", "errors": []}
        if method == "POST":
            ms = (time.monotonic() - started) * 1000
            version, n_errors = reply.get("version", "-"), len(reply.get("errors", []))
            log.info("api %s status=%d version=%s errors=%d ms=%.1f", url.path, status, version, n_errors, ms)
            if self.server.on_request is not None:
                try:
                    self.server.on_request(url.path, int(status), version, n_errors, ms)
                except Exception:
                    log.exception("api request hook failed")
        self._send(status, reply)

    def _read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as exc:
            raise BadRequest("bad Content-Length") from exc
        if length > MAX_BODY:
            raise BadRequest(f"request too large ({length} bytes, at most {MAX_BODY})")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        return data

    def _send(self, status: HTTPStatus, reply: dict[str, Any]) -> None:
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ---- endpoints ------------------------------------------------------------------------------------

    def _healthz(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return {"version": self.server.store.version}

    def _apply(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        docs = documents_from_json(body.get("documents"))
        return self.server.store.apply(docs, _namespace(body)).to_json()

    def _delete(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        ignore = bool(body.get("ignoreNotFound"))
        if "refs" in body:
            try:
                refs = [Ref.parse(str(r)) for r in body["refs"]]
            except (TypeError, ValueError) as exc:
                raise BadRequest(str(exc)) from exc
            return self.server.store.delete_refs(refs, ignore).to_json()
        docs = documents_from_json(body.get("documents"))
        return self.server.store.delete(docs, _namespace(body), ignore).to_json()

    def _resources(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        kind = None
        if query.get("kind"):
            info = resolve_kind(query["kind"])
            if info is None:
                raise BadRequest(f"unknown kind {query['kind']!r}")
            kind = info.kind
        snap_version = self.server.store.version
        items = self.server.store.select(kind, query.get("namespace") or None, query.get("name") or None)
        return {"version": snap_version, "items": items}

    def _label(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        try:
            ref = Ref.parse(str(body.get("ref")))
            set_labels = dict(body.get("set") or {})
            remove = [str(k) for k in body.get("remove") or []]
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"bad label request: {exc}") from exc
        return self.server.store.label(ref, set_labels, remove).to_json()


def _namespace(body: dict[str, Any]) -> str:
    return str(body.get("namespace") or DEFAULT_NAMESPACE)


def _error(exc: Exception, lines: list[str] | None = None) -> dict[str, Any]:
    return {"error": str(exc), "errors": lines if lines is not None else [str(exc)]}


class ApiServer:
    """Serves `store` on the Unix socket `socket_path` (see the module docstring)."""

    def __init__(self, store: Store, socket_path: Path | str, on_request: RequestHook | None = None) -> None:
        self.store = store
        self.on_request = on_request
        self.socket_path = Path(socket_path)
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None

    def _bind(self) -> _UnixServer:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()  # a leftover from a process that died; we own this path
        old_umask = os.umask(0o177)
        try:
            server = _UnixServer(str(self.socket_path), _Handler)
        except OSError as exc:
            raise ApiServerError(f"cannot listen on {self.socket_path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        server.store = self.store
        server.on_request = self.on_request
        self._server = server
        return server

    def start(self) -> None:
        """Bind and serve in a daemon thread.  Raises ApiServerError if the socket cannot be bound."""
        server = self._bind()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="apiserver", daemon=True)
        self._thread.start()
        log.info("apply API listening on %s", self.socket_path)

    def serve_forever(self) -> None:
        """Bind and serve in the calling thread until `stop()` is called from another thread."""
        self._bind().serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
