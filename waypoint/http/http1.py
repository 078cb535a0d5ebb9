"""HTTP/1.1 over trio streams, parsed by llhttp (`httptools`): the server side (one request at a time,
keep-alive) and the client side toward endpoints.

The parser is C; this module keeps only the framing decisions in Python: which body a message has
(Content-Length, chunked, none, or until close), keep-alive, and the limits.  Parsing is strict (llhttp
without leniencies): a request with both Content-Length and Transfer-Encoding, conflicting lengths, a
bad chunk size, a bare LF, obsolete line folding or a space before a header's colon is refused with 400,
as are upgrade requests that carry a body (their body would otherwise be read as the next request).

Server limits: the request head (line and headers) must arrive within `header_timeout` (else 408 and
close, or a quiet close on an idle keep-alive connection) and fit in `max_header_bytes` (else 431, and so
are chunk framing and trailers that carry no data past that size); anything llhttp cannot parse gets 400
and a close.  Bodies are streamed in both directions; a response head whose body came with it from the
endpoint goes out in the same write as the body's first bytes.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus

import httptools
import trio

from waypoint.errors import HttpError, UpstreamReset
from waypoint.http.exchange import Handler
from waypoint.l7.model import Headers, RequestHead, ResponseHead, forwardable

READ_SIZE = 65536
LINGER_BYTES = 256 * 1024  # read (and dropped) from a refused client before closing

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_NO_BODY_METHODS = frozenset({"HEAD"})
_FRAMING = frozenset({"content-length", "transfer-encoding"})  # header names that frame a body

# Set by `Http1Client.receive_response` in the task that relays the response: whether its body (or its
# end) arrived together with its head.  The server exchange then holds the response head back and sends
# it with the first body bytes, in one write, as nothing has to be waited for in between (otherwise the
# head goes out at once).  Task-local: each request's relay runs in its own task.
_BODY_READY: ContextVar[bool] = ContextVar("http1_body_ready", default=False)


@dataclass(frozen=True)
class Http1Settings:
    max_header_bytes: int = 60 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 300.0


class _Head:
    """A parsed message head: request line or status, headers (lower-case names), framing facts."""

    __slots__ = ("method", "target", "status", "version", "headers", "keep_alive", "upgrade", "size",
                 "until_close")

    def __init__(self, method: str, target: str, status: int, version: str, headers: Headers,
                 keep_alive: bool, upgrade: bool, size: int, until_close: bool) -> None:
        self.method = method
        self.target = target
        self.status = status
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.size = size
        self.until_close = until_close


class _Data:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _End:
    __slots__ = ()


class _Closed:
    __slots__ = ()


class _Bad:
    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


_END = _End()
_CLOSED = _Closed()
Event = _Head | _Data | _End | _Closed | _Bad


class _SkipBody(Exception):
    """Raised from the parser's callback to end a message at its head (the answer to a HEAD request)."""


class _Reader:
    """The messages of one direction of a connection, as events in order: a head, its body's chunks, its
    end (`_Bad` once the bytes stop being HTTP; nothing is parsed after it)."""

    def __init__(self, request: bool, max_header_bytes: int) -> None:
        self._request = request
        self._max = max_header_bytes
        self.events: deque[Event] = deque()
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser = self._new_parser()
        self.broken = False
        self.in_head = False
        self.in_body = False
        self.until_close = False  # the current message's body ends when the connection does
        self.skip_body = False  # (client) the next response answers a HEAD request
        self.upgraded = b""  # bytes after a message that switched protocols (101, or an upgrade request)
        self._head_bytes = 0
        self._quiet_bytes = 0
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        return httptools.HttpRequestParser(self) if self._request else httptools.HttpResponseParser(self)

    # ---- the parser's callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self._head_bytes = 0
        self._url = b""
        self._fields = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # (a chunked body's trailers are not kept)
            self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        fields = []
        size = len(self._url)
        framed = False
        for k, v in self._fields:  # (one pass: names lowered, the head's size, whether a body is framed)
            size += len(k) + len(v) + 4
            name = k.decode("latin-1").lower()
            if name in _FRAMING:
                framed = True
            fields.append((name, v.decode("latin-1")))
        headers = tuple(fields)
        if isinstance(parser, httptools.HttpRequestParser):
            method, status, until_close = parser.get_method().decode("latin-1"), 0, False
        else:
            method, status = "", parser.get_status_code()
            until_close = not framed and status >= 200 and status not in (204, 304) and not self.skip_body
        upgrade = parser.should_upgrade()
        if upgrade and self._request and framed and method != "CONNECT":
            raise HttpError(400, "a request asking for a protocol upgrade cannot carry a body")
        self.events.append(_Head(method, self._url.decode("latin-1"), status, parser.get_http_version(), headers,
                                 parser.should_keep_alive() and not until_close, upgrade, size, until_close))
        self.until_close = until_close
        self.in_body = True
        if self.skip_body and status >= 200:
            self.skip_body = False
            self.in_body = False
            self.events.append(_END)
            raise _SkipBody

    def on_body(self, body: bytes) -> None:
        self.events.append(_Data(body))

    def on_message_complete(self) -> None:
        self.in_body = False
        self.events.append(_END)

    # ---- input ---------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        began_in_head, began_in_body, events = self.in_head, self.in_body, len(self.events)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # the message has ended (an upgrade request has no body here): nothing more is parsed after it,
            # and what followed it in `data` is the upgraded protocol's (kept in `upgraded`)
            self.broken = True
            if exc.args and isinstance(exc.args[0], int):
                self.upgraded += data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _SkipBody):  # a fresh parser for the next message, the rest dropped
                self.parser = self._new_parser()
                return
            self.broken = True
            if isinstance(cause, HttpError):
                self.events.append(_Bad(cause.status, str(cause)))
            else:
                self.events.append(_Bad(400, f"malformed HTTP/1.1: {_reason(exc)}"))
            return
        if self.in_head and began_in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._max:
                self.broken = True
                what = "request" if self._request else "response"
                self.events.append(_Bad(431, f"{what} headers are more than {self._max} bytes"))
        elif self.in_body and began_in_body and len(self.events) == events:
            # bytes of a body that carried no data: chunk framing and trailers, bounded like a head
            self._quiet_bytes += len(data)
            if self._quiet_bytes > self._max:
                self.broken = True
                self.events.append(_Bad(431, f"chunk framing and trailers are more than {self._max} bytes"))
        else:
            self._quiet_bytes = 0

    def closed(self) -> None:
        """The peer closed its side: a body that runs until the close has ended."""
        if self.in_body and self.until_close and not self.broken:
            self.in_body = False
            self.events.append(_END)
        self.broken = True
        self.events.append(_CLOSED)


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.removeprefix("HPE_").replace("_", " ").lower() if text.startswith("HPE_") else text


def _head_bytes(start: str, headers: Headers) -> bytes:
    """The head's bytes; a name or value that would break the framing (CR, LF) is refused."""
    block = start + "\r\n".join(map(": ".join, headers)) + "\r\n\r\n" if headers else start + "\r\n"
    if block.count("\n") != len(headers) + 2 or block.count("\r") != len(headers) + 2:
        raise _LocalError("a header name or value contains CR or LF")
    return block.encode("latin-1")


class _LocalError(Exception):
    """The waypoint itself was about to send something that is not valid HTTP/1.1."""


def error_response(status: int, message: str) -> bytes:
    """A whole response with a plain-text body, for refusing a request before closing."""
    body = message.encode()
    return _head_bytes(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n",
                       (("content-type", "text/plain"), ("connection", "close"),
                        ("content-length", str(len(body))))) + body


# body framing of an outgoing message
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _Writer:
    """The body of one outgoing message, framed as its head said."""

    __slots__ = ("mode", "remaining")

    def __init__(self, mode: int, remaining: int = 0) -> None:
        self.mode = mode
        self.remaining = remaining

    def data(self, data: bytes) -> bytes:
        if self.mode == _CHUNKED:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self.mode == _LENGTH:
            if len(data) > self.remaining:
                raise _LocalError(f"{len(data)} bytes of body where {self.remaining} remain of its content-length")
            self.remaining -= len(data)
            return data
        return data if self.mode == _UNTIL_CLOSE else b""

    def end(self) -> tuple[bytes, bool]:
        """The bytes that end the body, and whether the connection can carry another message."""
        if self.mode == _CHUNKED:
            return b"0\r\n\r\n", True
        if self.mode == _LENGTH:
            return b"", self.remaining == 0
        return b"", self.mode == _NONE


def response_framing(method: str, status: int, headers: Headers, version: str) -> tuple[_Writer, Headers, bool]:
    """How a response's body goes to a client that spoke HTTP/`version`: its writer, the headers that
    framing adds, and whether the connection can serve another request after it (not when the body of an
    HTTP/1.0 client's response ends with the connection)."""
    if method in _NO_BODY_METHODS or status < 200 or status in (204, 304):
        return _Writer(_NONE), (), True
    length = _content_length(headers)
    if length is not None:
        return _Writer(_LENGTH, length), (), True
    if version == "1.1":
        return _Writer(_CHUNKED), (("transfer-encoding", "chunked"),), True
    return _Writer(_UNTIL_CLOSE), (), False


def _content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k == "content-length":
            if not v.isdigit():
                raise _LocalError(f"content-length {v!r} is not a number")
            return int(v)
    return None


class _ServerExchange:
    def __init__(self, server: Http1Server, head: RequestHead, method: str) -> None:
        self._server = server
        self.head = head
        self._method = method
        self._started = False
        self._writer = _Writer(_NONE)
        self._held = b""  # the response head, held back to go out with the first body bytes

    @property
    def response_started(self) -> bool:
        return self._started

    async def body(self) -> AsyncIterator[bytes]:
        server = self._server
        while not server.request_done:
            event = await server.next_event()
            if isinstance(event, _Data):
                yield event.data
            elif event is _END:
                server.request_done = True
                return
            elif isinstance(event, _Bad):
                raise HttpError(event.status, event.message)
            else:
                raise HttpError(400, "request body ended early")

    async def send_head(self, head: ResponseHead, end: bool = False) -> None:
        self._started = True
        server = self._server
        headers = forwardable(head.headers)
        status = head.status
        self._writer, extra, reusable = response_framing(self._method, status, headers, server.version)
        server.keep_alive = server.keep_alive and reusable
        if server.closing or server.draining or not server.keep_alive:
            extra += (("connection", "close"),)
        data = _head_bytes(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n", headers + extra if extra else headers)
        if end:
            tail, reusable = self._writer.end()
            server.response_done = True
            server.keep_alive = server.keep_alive and reusable
            data += tail
        elif _BODY_READY.get():
            _BODY_READY.set(False)
            self._held = data
            return
        await server.stream.send_all(data)

    async def send_data(self, data: bytes) -> None:
        if data:
            out = self._writer.data(data)
            if self._held:
                out, self._held = self._held + out, b""
            if out:
                await self._server.stream.send_all(out)

    async def end(self) -> None:
        server = self._server
        tail, reusable = self._writer.end()
        server.response_done = True
        server.keep_alive = server.keep_alive and reusable
        if self._held:
            tail, self._held = self._held + tail, b""
        if tail:
            await server.stream.send_all(tail)

    async def reset(self) -> None:
        self._server.closing = True
        if self._held:  # the head was as good as sent: the client sees the response cut short
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._server.stream.send_all(self._held)
            self._held = b""
        await self._server.stream.aclose()


class Http1Server:
    """Serves the requests of one client connection, one after the other."""

    def __init__(self, stream: trio.abc.Stream, settings: Http1Settings = Http1Settings(),
                 initial: bytes = b"") -> None:
        self.stream = stream
        self.settings = settings
        self.reader = _Reader(True, settings.max_header_bytes)
        if initial:
            self.reader.feed(initial)
        self.closing = False
        self.draining = False  # `drain`: the next response is the connection's last
        self.version = "1.1"  # of the current request
        self.keep_alive = True  # the current exchange leaves the connection usable
        self.request_done = True
        self.response_done = True
        self._upgrade = False

    def drain(self) -> None:
        """The waypoint is going: the next response head says `Connection: close` and the connection closes
        after that response (after the one in progress, if its head has gone out), so a keep-alive client
        opens its next connection elsewhere."""
        self.draining = True

    async def next_event(self) -> Event:
        events = self.reader.events
        while not events:
            data = await self.stream.receive_some(READ_SIZE)
            if data:
                self.reader.feed(bytes(data))
            else:
                self.reader.closed()
        return events.popleft()

    async def _read_head(self) -> _Head | None:
        """The next request's head: its first byte may take `idle_timeout` (keep-alive), the rest of the
        head must follow within `header_timeout`.  None when the client went away quietly.  One timer,
        and none at all when the head has already arrived (pipelined, or with the tunnel's first bytes)."""
        reader = self.reader
        if not reader.events:
            begun = reader.in_head
            timeout = self.settings.header_timeout if begun else self.settings.idle_timeout
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                while not reader.events:
                    data = await self.stream.receive_some(READ_SIZE)
                    if not data:
                        return None
                    reader.feed(bytes(data))
                    if not begun:  # the head has begun: the rest of it within `header_timeout`
                        begun = True
                        if not reader.events:  # (not when it came whole: moving a deadline re-sorts timers)
                            scope.deadline = trio.current_time() + self.settings.header_timeout
            if scope.cancelled_caught:
                if not begun:
                    return None
                raise HttpError(408, "request headers did not arrive in time")
        event = reader.events.popleft()
        if isinstance(event, _Head):
            if event.size > self.settings.max_header_bytes:
                raise HttpError(431, f"request headers are {event.size} bytes, "
                                     f"more than {self.settings.max_header_bytes}")
            return event
        if event is _CLOSED:
            return None
        if isinstance(event, _Bad):
            raise HttpError(event.status, event.message)
        raise HttpError(400, f"unexpected {type(event).__name__.strip('_').lower()} before a request")

    async def serve(self, handler: Handler) -> None:
        try:
            while not self.closing:
                try:
                    request = await self._read_head()
                except HttpError as exc:
                    await self._refuse(exc.status, str(exc))
                    return
                if request is None:
                    return
                self.version = request.version
                self.keep_alive = request.keep_alive
                self._upgrade = request.upgrade
                self.request_done = self.response_done = False
                exchange = _ServerExchange(self, _request_head(request), request.method)
                try:
                    await handler(exchange)
                except (HttpError, ExceptionGroup) as exc:  # (the body's error, through the pipeline's nurseries)
                    error = _http_error(exc)
                    if error is None:
                        raise
                    if not exchange.response_started:
                        await self._refuse(error.status, str(error))
                    return
                if not await self._next_cycle():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, _LocalError):
            return
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await self.stream.aclose()

    async def _next_cycle(self) -> bool:
        if not self.response_done or not self.keep_alive or self.closing or self.draining or self._upgrade:
            return False
        events = self.reader.events
        while events and not self.request_done:  # the handler left the body unread: drain it
            event = events.popleft()
            if event is _END:
                self.request_done = True
            elif not isinstance(event, _Data):
                return False
        if self.request_done:
            return True
        with trio.move_on_after(self.settings.header_timeout):  # (the rest of it is still coming)
            while not self.request_done:
                event = await self.next_event()
                if event is _END:
                    self.request_done = True
                elif not isinstance(event, _Data):
                    return False
        return self.request_done

    async def _refuse(self, status: int, message: str) -> None:
        """Answer `status` and close.  What the client already sent is read (for at most a second or
        `LINGER_BYTES`) before the close: closing with unread bytes resets the connection, and a reset can
        discard the answer before the client reads it."""
        self.closing = True
        try:
            await self.stream.send_all(error_response(status, message))
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            with trio.move_on_after(min(1.0, self.settings.header_timeout)):
                left = LINGER_BYTES
                while left > 0 and (data := await self.stream.receive_some(READ_SIZE)):
                    left -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _http_error(exc: BaseException) -> HttpError | None:
    """The `HttpError` that `exc` is, or that is all a group of them holds (None for anything else)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        errors = [_http_error(e) for e in exc.exceptions]
        if errors and all(errors):
            return errors[0]
    return None


def _request_head(request: _Head) -> RequestHead:
    authority = ""
    headers = request.headers
    for k, v in headers:
        if k == "host":
            authority = v
            headers = tuple(h for h in headers if h[0] != "host")
            break
    return RequestHead(method=request.method, path=request.target, authority=authority, headers=headers,
                       protocol=f"HTTP/{request.version}")


class Http1Client:
    """One connection to an endpoint, one request at a time (reused while both sides keep it alive)."""

    def __init__(self, stream: trio.abc.Stream, max_header_bytes: int = 60 * 1024) -> None:
        self.stream = stream
        self.reader = _Reader(False, max_header_bytes)
        self._idle = True  # no request sent yet, or the last exchange ended cleanly
        self._sent = False  # the current request has gone out whole
        self._received = False  # the current response has been read to its end
        self._keep_alive = True

    async def _next_event(self) -> Event:
        events = self.reader.events
        while not events:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamReset(f"connection to endpoint reset: {exc}") from exc
            if data:
                self.reader.feed(bytes(data))
            else:
                self.reader.closed()
        event = events.popleft()
        if isinstance(event, _Bad):
            raise UpstreamReset(f"endpoint sent malformed HTTP: {event.message}")
        return event

    async def send_request(self, head: RequestHead, body: AsyncIterable[bytes]) -> None:
        self._idle = self._sent = self._received = False
        headers = (("host", head.authority), *forwardable(head.headers))
        try:
            length = _content_length(headers)
        except _LocalError as exc:
            raise HttpError(400, f"request cannot be sent as HTTP/1.1: {exc}") from exc
        self.reader.skip_body = head.method in _NO_BODY_METHODS
        chunks = aiter(body)
        first = b""
        if length is None:  # no declared length: chunked when a body turns out to exist
            async for chunk in chunks:
                if chunk:
                    first = chunk
                    break
            writer = _Writer(_CHUNKED) if first else _Writer(_NONE)
            if first:
                headers = (*headers, ("transfer-encoding", "chunked"))
        else:
            writer = _Writer(_LENGTH, length)
        try:
            data = _head_bytes(f"{head.method} {head.path} HTTP/1.1\r\n", headers)
        except _LocalError as exc:
            raise HttpError(400, f"request cannot be sent as HTTP/1.1: {exc}") from exc
        try:
            if first:
                data += writer.data(first)
            await self.stream.send_all(data)
            async for chunk in chunks:
                if chunk:
                    await self.stream.send_all(writer.data(chunk))
            tail, reusable = writer.end()
            if tail:
                await self.stream.send_all(tail)
        except _LocalError as exc:
            self._keep_alive = False
            raise HttpError(400, f"request body does not match its content-length: {exc}") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._keep_alive = False
            raise UpstreamReset(f"connection to endpoint reset while sending: {exc}") from exc
        self._sent = True
        self._keep_alive = self._keep_alive and reusable

    async def receive_response(self) -> ResponseHead:
        while True:
            event = await self._next_event()
            if isinstance(event, _Head):
                if 100 <= event.status < 200 and event.status != 101:
                    while await self._next_event() is not _END:  # an informational answer: skip it
                        pass
                    continue
                self._keep_alive = self._keep_alive and event.keep_alive and not event.upgrade
                _BODY_READY.set(bool(self.reader.events))
                return ResponseHead(event.status, event.headers)
            raise UpstreamReset("endpoint closed the connection before answering")

    async def response_body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next_event()
            if isinstance(event, _Data):
                yield event.data
            elif event is _END:
                self._received = True
                return
            else:
                raise UpstreamReset("endpoint closed the connection in the middle of the response")

    @property
    def reusable(self) -> bool:
        if self._idle:
            return True
        if self._sent and self._received and self._keep_alive and not self.reader.broken \
                and not self.reader.events:
            self._idle = True
            return True
        return False

    async def aclose(self) -> None:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await self.stream.aclose()
