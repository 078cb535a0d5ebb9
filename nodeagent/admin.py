"""The node agent's HTTP endpoints: admin (15000), metrics (15020) and readiness (15021).

    admin, loopback only (127.0.0.1:15000)
        GET /              the list of endpoints
        GET /healthz       200 "ok" while the agent runs
        GET /workloads     JSON: every workload the agent knows, `local` for those on its node
        GET /policies      JSON: authorization policies, with the local workloads each applies to
        GET /certs         JSON: the certificates the agent holds for its pods (identity, state, expiry)
        GET /config_dump   JSON: all of the above plus services and the discovery versions
    metrics (0.0.0.0:15020)
        GET /metrics       Prometheus text (also /stats/prometheus)
    readiness (0.0.0.0:15021)
        GET /healthz/ready 200 "ready", or 503 with the reason

Routing is pure (`AdminView.handle`, `metrics_handler`, `readiness_handler`: a `Request` in, a
`Response` out) and tested without sockets.  `serve_http` is the thin trio + h11 layer: HTTP/1.1 with
keep-alive, GET and HEAD only, a 16 KiB limit on the request head (431 beyond), a time limit on each
request (408), 400 for anything h11 cannot parse, 500 if a handler fails.  No request can stop a server.

Each `serve_*` function is meant for `await nursery.start(...)`: it binds, reports the bound port
through `task_status` (port 0 picks a free one) and serves until cancelled.
"""

from __future__ import annotations

import dataclasses
import http
import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import h11
import trio
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mesh.proto import discovery_pb2 as pb
from nodeagent.errors import NodeAgentError

log = logging.getLogger(__name__)

ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
MAX_REQUESTS_PER_CONNECTION = 100
RECEIVE_SIZE = 8192

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


class AdminError(NodeAgentError):
    """An HTTP endpoint of the agent cannot start."""


# --- values ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, method: str, target: str) -> Request:
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        return cls(method.upper(), parts.path or "/", query)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, (text.rstrip("\n") + "\n").encode())

    @classmethod
    def json(cls, obj: object, status: int = 200) -> Response:
        return cls(status, (json.dumps(obj, indent=1, default=str) + "\n").encode(), JSON)


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""

    @classmethod
    def from_checks(cls, checks: Mapping[str, bool]) -> Readiness:
        """Ready when every check passes; otherwise the reason names those that do not."""
        failing = [name for name, ok in checks.items() if not ok]
        return cls(True) if not failing else cls(False, "waiting for " + ", ".join(failing))


class MeshView(Protocol):
    """The reads the admin endpoint needs from the agent's read model (`nodeagent.state.MeshState`)."""

    version: dict[str, str]

    def workloads(self) -> list[pb.Workload]: ...
    def services(self) -> list[pb.Service]: ...
    def policies(self) -> list[pb.Authorization]: ...
    def policies_for(self, workload: pb.Workload) -> list[pb.Authorization]: ...


# --- routes (pure) --------------------------------------------------------------------------------------


def message_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def plain(item: object) -> object:
    """A certificate status (a dataclass, a mapping or anything else) as JSON-ready data."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    return {"value": str(item)}


class AdminView:
    """The admin endpoints over the read model; reads only."""

    def __init__(
        self,
        state: MeshView,
        certs: Callable[[], Sequence[object]],
        *,
        node: str = "",
        enrollment: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self._state = state
        self._certs = certs
        self._node = node
        self._enrollment = enrollment
        self._routes: dict[str, Callable[[Request], Response]] = {
            "/": self._index,
            "/healthz": lambda _: Response.text("ok"),
            "/workloads": lambda _: Response.json({"node": self._node, "workloads": self.workloads()}),
            "/policies": lambda _: Response.json({"node": self._node, "policies": self.policies()}),
            "/certs": lambda _: Response.json({"node": self._node, "certificates": self.certificates()}),
            "/config_dump": lambda _: Response.json(self.config_dump()),
        }

    def handle(self, request: Request) -> Response:
        route = self._routes.get(request.path.rstrip("/") or "/")
        if route is None:
            return Response.text(f"no such endpoint {request.path}: try {', '.join(self._routes)}", 404)
        return route(request)

    def _index(self, _: Request) -> Response:
        return Response.text("node agent admin" + (f" on {self._node}" if self._node else "") + "\n"
                             + "\n".join(self._routes))

    def workloads(self) -> list[dict[str, Any]]:
        enrollment = self._enrollment() if self._enrollment else {}
        out = []
        for w in sorted(self._state.workloads(), key=lambda w: (w.namespace, w.name, w.uid)):
            d = message_dict(w)
            d["local"] = bool(self._node) and w.node == self._node
            if w.uid in enrollment:
                d["enrollment"] = enrollment[w.uid]
            out.append(d)
        return out

    def policies(self) -> list[dict[str, Any]]:
        local = [w for w in self._state.workloads() if self._node and w.node == self._node]
        applies: dict[str, list[str]] = {}
        for w in sorted(local, key=lambda w: w.uid):
            for p in self._state.policies_for(w):
                applies.setdefault(f"{p.namespace}/{p.name}", []).append(w.uid)
        out = []
        for p in sorted(self._state.policies(), key=lambda p: (p.namespace, p.name)):
            d = message_dict(p)
            key = f"{p.namespace}/{p.name}"
            d["key"] = key
            d["applies_to"] = applies.get(key, [])
            out.append(d)
        return out

    def certificates(self) -> list[object]:
        return [plain(c) for c in self._certs()]

    def config_dump(self) -> dict[str, Any]:
        return {
            "node": self._node,
            "versions": dict(self._state.version),
            "workloads": self.workloads(),
            "services": [message_dict(s) for s in sorted(self._state.services(),
                                                          key=lambda s: (s.namespace, s.hostname))],
            "policies": self.policies(),
            "certificates": self.certificates(),
        }


def metrics_handler(registry: CollectorRegistry) -> Handler:
    def handle(request: Request) -> Response:
        if request.path in ("/metrics", "/stats/prometheus"):
            return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)
        return Response.text(f"no such endpoint {request.path}: try /metrics", 404)

    return handle


def readiness_handler(ready: Callable[[], Readiness]) -> Handler:
    def handle(request: Request) -> Response:
        if request.path != "/healthz/ready":
            return Response.text(f"no such endpoint {request.path}: try /healthz/ready", 404)
        try:
            r = ready()
        except Exception as exc:  # a failing check means "not ready", not a server error
            r = Readiness(False, f"readiness check failed: {type(exc).__name__}: {exc}")
        return Response.text("ready") if r.ready else Response.text(f"not ready: {r.reason or 'starting'}", 503)

    return handle


# --- the HTTP/1.1 layer (trio + h11) -------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc
        conn.receive_data(bytes(data))


async def _send(stream: trio.abc.Stream, conn: h11.Connection, resp: Response, *, close: bool,
                head: bool = False) -> None:
    headers = [("content-type", resp.content_type), ("content-length", str(len(resp.body))),
               ("cache-control", "no-store")]
    if close:
        headers.append(("connection", "close"))
    try:
        reason = http.HTTPStatus(resp.status).phrase
    except ValueError:
        reason = ""
    data = conn.send(h11.Response(status_code=resp.status, headers=headers, reason=reason)) or b""
    if resp.body and not head:
        data += conn.send(h11.Data(data=resp.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        await stream.send_all(data)


def _safe_handle(handler: Handler, request: Request) -> Response:
    if request.method not in ("GET", "HEAD"):
        return Response.text(f"method {request.method} not allowed: use GET", 405)
    try:
        return handler(request)
    except Exception as exc:  # a bug in a handler must not take the server down
        log.exception("admin handler failed for %s", request.path)
        return Response.text(f"internal error: {type(exc).__name__}: {exc}", 500)


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)


async def _drain_body(stream: trio.abc.Stream, conn: h11.Connection) -> bool:
    """Read the rest of the request (a GET rarely has a body); False if it is too large, too slow or
    the client went away."""
    size = 0
    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.ConnectionClosed):
                return False
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    return False
    return False


async def _linger(stream: trio.abc.Stream) -> None:
    """After an error answer, stop sending and read what the client still sends for a moment, so that
    closing with unread data does not reset the connection before the client reads the answer."""
    with trio.move_on_after(1):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        for _ in range(64):
            if not await stream.receive_some(RECEIVE_SIZE):
                break


async def _serve_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    error: Response | None = None
    try:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                event = await _next_event(stream, conn)
            if timer.cancelled_caught:
                if conn.trailing_data[0] or conn.their_state is not h11.IDLE:
                    error = Response.text("request timed out", 408)
                return  # an idle keep-alive connection is closed without a word
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed: the client is done
            if _head_size(event) > MAX_HEAD:
                error = Response.text(f"request head larger than {MAX_HEAD} bytes", 431)
                return
            request = Request.parse(event.method.decode("latin-1"), event.target.decode("latin-1"))
            response = _safe_handle(handler, request)
            if response.status == 405:
                error = response
                return
            if not await _drain_body(stream, conn):
                error = Response.text("request body too large, too slow or cut short", 413)
                return
            await _send(stream, conn, response, close=False, head=request.method == "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # the client asked to close (or HTTP/1.0)
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        error = Response.text(f"bad request: {exc}", exc.error_status_hint or 400)
    except (_ClientGone, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        error = None
    finally:
        try:
            if error is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(stream, conn, error, close=True)
                await _linger(stream)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(1):
            await stream.aclose()


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    name: str = "http",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; reports the bound port through `task_status`."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise AdminError(f"cannot listen for the {name} endpoint on {host}:{port}: {exc.strerror or exc}"
                             " (is another agent running on this node?)") from None
    bound = listeners[0].socket.getsockname()[1]
    log.info("%s endpoint listening on %s:%d", name, host, bound)

    async def on_connection(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, handler)

    task_status.started(bound)
    await trio.serve_listeners(on_connection, listeners)


async def serve_admin(
    state: MeshView,
    certs: Callable[[], Sequence[object]],
    *,
    node: str = "",
    enrollment: Callable[[], Mapping[str, object]] | None = None,
    host: str = "127.0.0.1",
    port: int = ADMIN_PORT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin endpoint.  `certs()` returns certificate statuses (e.g. `SecretManager.status`);
    `enrollment()`, if given, maps a workload uid to its enrollment state for `/workloads`."""
    view = AdminView(state, certs, node=node, enrollment=enrollment)
    await serve_http(view.handle, host, port, name="admin", task_status=task_status)


async def serve_metrics(
    registry: CollectorRegistry,
    *,
    host: str = "0.0.0.0",
    port: int = METRICS_PORT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(metrics_handler(registry), host, port, name="metrics", task_status=task_status)


async def serve_readiness(
    ready: Callable[[], Readiness],
    *,
    host: str = "0.0.0.0",
    port: int = READINESS_PORT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(readiness_handler(ready), host, port, name="readiness", task_status=task_status)
