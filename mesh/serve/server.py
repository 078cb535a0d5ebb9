"""The HTTP/1.1 server every process's small endpoints run on: trio + h11, over TCP or a Unix socket.

    await nursery.start(partial(serve_http, router, "127.0.0.1", 15000, name="admin"))   # -> bound port
    await nursery.start(partial(serve_unix, router, state_dir / "api.sock", name="apply API"))
    await nursery.start(partial(serve_http, router, "0.0.0.0", 15017, name="webhook", tls=ssl_context))

Why this style: the node agent and the waypoint are trio programs and h11 is sans-IO, so the server is
a thin loop around a pure handler (`mesh.serve.routes`).  A process whose main loop is not trio (the
control plane, on grpc.aio) runs the same server in a thread of its own (`mesh.serve.thread`), where
handlers run in worker threads (`in_thread=True`) and read thread-safe state or call into their loop.

Behaviour: keep-alive, a 16 KiB limit on the request head (431 beyond), a body limit per server (413),
a time limit on each request (408; an idle keep-alive connection is closed without a word), 400 for
anything h11 cannot parse, 500 if a handler raises.  No request can stop a server.  Over TCP it may
serve HTTPS (`tls=`, an `ssl.SSLContext`; the control plane's admission webhook): a client that fails
the handshake is dropped like one that goes away.
"""

from __future__ import annotations

import contextlib
import http
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import h11
import trio

from mesh import netns as mnetns
from mesh import reuseport
from mesh.serve.errors import ListenError
from mesh.serve.routes import Handler, Request, Response

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
MAX_REQUESTS_PER_CONNECTION = 100
RECEIVE_SIZE = 65536


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


async def _send(stream: trio.abc.Stream, conn: h11.Connection, resp: Response, *, head: bool = False) -> None:
    headers = [("content-type", resp.content_type), ("content-length", str(len(resp.body))),
               ("cache-control", "no-store"), *resp.headers]
    if resp.close:
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


def _refusal(text: str, status: int) -> Response:
    return Response(status, (text + "\n").encode(), close=True)


async def _read_body(stream: trio.abc.Stream, conn: h11.Connection, max_body: int) -> bytes | None:
    """The rest of the request; None if it is too large, too slow or the client went away."""
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    return None
                chunks.append(bytes(event.data))
    return None


async def _answer(handler: Handler, request: Request, in_thread: bool) -> Response:
    try:
        if in_thread:
            return await trio.to_thread.run_sync(handler, request, abandon_on_cancel=True)
        return handler(request)
    except Exception as exc:  # a bug in a handler must not take the server down
        log.exception("handler failed for %s %s", request.method, request.path)
        return Response.text(f"internal error: {type(exc).__name__}: {exc}", 500)


def _declared_length(event: h11.Request) -> int:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)  # h11 checked that it is a number
    return 0


def _head_size(event: h11.Request) -> int:
    return len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)


async def _linger(stream: trio.abc.Stream) -> None:
    """After a refusal, stop sending and read what the client still sends for a moment, so that closing
    with unread data does not reset the connection before the client reads the answer."""
    with trio.move_on_after(1):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
        for _ in range(64):
            if not await stream.receive_some(RECEIVE_SIZE):
                break


def _is_local(stream: trio.abc.Stream) -> bool:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return False
    if stream.socket.family == socket.AF_UNIX:
        return True
    try:
        return ipaddress.ip_address(stream.socket.getpeername()[0]).is_loopback
    except (OSError, ValueError):
        return False


async def serve_connection(stream: trio.abc.Stream, handler: Handler, *, max_body: int = MAX_BODY,
                           in_thread: bool = False) -> None:
    """Answer the requests of one connection, then close it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    local = _is_local(stream)
    refusal: Response | None = None
    try:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                event = await _next_event(stream, conn)
            if timer.cancelled_caught:
                if conn.trailing_data[0] or conn.their_state is not h11.IDLE:
                    refusal = _refusal("request timed out", 408)
                return  # an idle keep-alive connection is closed without a word
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed: the client is done
            if _head_size(event) > MAX_HEAD:
                refusal = _refusal(f"request head larger than {MAX_HEAD} bytes", 431)
                return
            if _declared_length(event) > max_body:
                refusal = _refusal(f"request body larger than {max_body} bytes", 413)
                return
            body = await _read_body(stream, conn, max_body)
            if body is None:
                refusal = _refusal("request body too large, too slow or cut short", 413)
                return
            request = Request.parse(event.method.decode("latin-1"), event.target.decode("latin-1"), body=body,
                                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                                    local=local)
            response = await _answer(handler, request, in_thread)
            await _send(stream, conn, response, head=request.method == "HEAD")
            if response.close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # refused, or the client asked to close (or spoke HTTP/1.0)
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        refusal = _refusal(f"bad request: {exc}", exc.error_status_hint or 400)
    except (_ClientGone, h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        refusal = None
    finally:
        try:
            if refusal is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(stream, conn, refusal)
                await _linger(stream)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(1):
            await stream.aclose()


async def _serve(listeners: list[trio.SocketListener], handler: Handler, max_body: int, in_thread: bool,
                 tls: ssl.SSLContext | None = None) -> None:
    async def on_connection(stream: trio.abc.Stream) -> None:
        await serve_connection(stream, handler, max_body=max_body, in_thread=in_thread)

    if tls is None:
        await trio.serve_listeners(on_connection, listeners)
    else:
        await trio.serve_listeners(on_connection, [trio.SSLListener(listener, tls, https_compatible=True)
                                                   for listener in listeners])


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    name: str = "http",
    max_body: int = MAX_BODY,
    in_thread: bool = False,
    tls: ssl.SSLContext | None = None,
    netns: str | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on TCP host:port (HTTPS with `tls`) until cancelled; reports the bound port (port 0
    picks one).  With `netns` the listening socket is made inside that network namespace (and stays
    there), while the server runs where it is.  With `reuse_port` the port is shared with the process's
    successor, which takes the new connections once it listens (`mesh.reuseport`: a node agent's surge)."""
    try:
        if netns or reuse_port:
            listeners = [_listener_in(netns, host, port, reuse_port=reuse_port)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(f"cannot listen for the {name} endpoint on {host}:{port}: {exc.strerror or exc}"
                          " (is another instance running here?)") from None
    bound = listeners[0].socket.getsockname()[1]
    log.info("%s endpoint listening on %s:%d%s", name, host, bound, " (HTTPS)" if tls is not None else "")
    task_status.started(bound)
    await _serve(listeners, handler, max_body, in_thread, tls)


def _listener_in(name: str | None, host: str, port: int, *, reuse_port: bool = False) -> trio.SocketListener:
    """A TCP listener made inside network namespace `name` (here when None) on one numeric address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with mnetns.entered(name) if name else contextlib.nullcontext():
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            reuseport.share(sock)
        sock.bind((host, port))
        sock.listen(128)
        if reuse_port:
            reuseport.prefer_newest(sock)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def serve_unix(
    handler: Handler,
    path: Path | str,
    *,
    name: str = "http",
    mode: int = 0o600,
    max_body: int = MAX_BODY,
    in_thread: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on the Unix socket `path` (file mode `mode`, set before it accepts anyone) until
    cancelled, then remove the socket file.  A file left at `path` by a process that died is replaced."""
    path = Path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        await sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
        inode = path.stat().st_ino
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen for the {name} endpoint on {path}: {exc.strerror or exc}") from None
    log.info("%s endpoint listening on %s", name, path)
    try:
        task_status.started(str(path))
        await _serve([trio.SocketListener(sock)], handler, max_body, in_thread)
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:  # still ours, not a newer process's
                path.unlink()
