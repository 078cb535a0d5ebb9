"""HTTP/1.1 over trio streams with h11: the server side (one request at a time, keep-alive) and the
client side toward endpoints.

Server limits: the request head (line and headers) must arrive within `header_timeout` (else 408 and
close, or a quiet close on an idle keep-alive connection) and fit in `max_header_bytes` (else 431);
anything h11 cannot parse gets 400 and a close.  Bodies are streamed in both directions.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

import h11
import trio

from waypoint.errors import HttpError, UpstreamReset
from waypoint.http.exchange import Handler
from waypoint.l7.model import RequestHead, ResponseHead, forwardable

READ_SIZE = 65536


@dataclass(frozen=True)
class Http1Settings:
    max_header_bytes: int = 60 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 300.0


def _decode(headers: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers)


def _encode(headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def error_response(status: int, message: str) -> tuple[h11.Response, bytes]:
    body = message.encode()
    return h11.Response(status_code=status, headers=[("content-type", "text/plain"), ("connection", "close"),
                                                     ("content-length", str(len(body)))]), body


class _ServerExchange:
    def __init__(self, server: Http1Server, head: RequestHead) -> None:
        self._server = server
        self.head = head
        self._started = False

    @property
    def response_started(self) -> bool:
        return self._started

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._server._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise HttpError(400, "request body ended early")

    async def send_head(self, head: ResponseHead, end: bool = False) -> None:
        self._started = True
        headers = list(forwardable(head.headers))
        if self._server.closing:
            headers.append(("connection", "close"))
        await self._server._send(h11.Response(status_code=head.status, headers=_encode(tuple(headers))))
        if end:
            await self.end()

    async def send_data(self, data: bytes) -> None:
        if data:
            await self._server._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._server._send(h11.EndOfMessage())

    async def reset(self) -> None:
        self._server.closing = True
        await self._server.stream.aclose()


class Http1Server:
    """Serves the requests of one client connection, one after the other."""

    def __init__(self, stream: trio.abc.Stream, settings: Http1Settings = Http1Settings(),
                 initial: bytes = b"") -> None:
        self.stream = stream
        self.settings = settings
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
        if initial:
            self.conn.receive_data(initial)
        self.closing = False

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.stream.receive_some(READ_SIZE)
            self.conn.receive_data(bytes(data))

    async def _read_head(self) -> h11.Request | None:
        """The next request's head: its first byte may take `idle_timeout` (keep-alive), the rest of the
        head must follow within `header_timeout`.  None when the client went away quietly."""
        event: object = self.conn.next_event()
        if event is h11.NEED_DATA:
            with trio.move_on_after(self.settings.idle_timeout):
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    return None
                self.conn.receive_data(bytes(data))
                event = None
            if event is not None:
                return None
        with trio.move_on_after(self.settings.header_timeout):
            if event is None:
                event = await self._next_event()
            if isinstance(event, h11.Request):
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > self.settings.max_header_bytes:
                    raise HttpError(431, f"request headers are {size} bytes, more than {self.settings.max_header_bytes}")
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            raise HttpError(400, f"unexpected {type(event).__name__} before a request")
        raise HttpError(408, "request headers did not arrive in time")

    async def serve(self, handler: Handler) -> None:
        try:
            while not self.closing:
                try:
                    request = await self._read_head()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(exc.error_status_hint, str(exc) or "malformed request")
                    return
                except HttpError as exc:
                    await self._refuse(exc.status, str(exc))
                    return
                if request is None:
                    return
                head = _request_head(request)
                exchange = _ServerExchange(self, head)
                try:
                    await handler(exchange)
                except HttpError as exc:
                    if not exchange.response_started:
                        await self._refuse(exc.status, str(exc))
                    return
                except h11.RemoteProtocolError as exc:
                    if not exchange.response_started:
                        await self._refuse(exc.error_status_hint, str(exc))
                    return
                if not await self._next_cycle():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await self.stream.aclose()

    async def _next_cycle(self) -> bool:
        if self.conn.our_state is not h11.DONE:
            return False
        with trio.move_on_after(self.settings.header_timeout):
            while self.conn.their_state is h11.SEND_BODY:  # the handler left the body unread: drain it
                event = await self._next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return False
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    async def _refuse(self, status: int, message: str) -> None:
        response, body = error_response(status, message)
        try:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # h11 allows this after a parse error
                await self._send(response)
                await self._send(h11.Data(data=body))
                await self._send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closing = True


def _request_head(request: h11.Request) -> RequestHead:
    headers = _decode(request.headers)
    authority = next((v for k, v in headers if k == "host"), "")
    version = request.http_version.decode()
    return RequestHead(method=request.method.decode(), path=request.target.decode("latin-1"), authority=authority,
                       headers=tuple((k, v) for k, v in headers if k != "host"), protocol=f"HTTP/{version}")


class Http1Client:
    """One connection to an endpoint, one request at a time (reused while both sides keep it alive)."""

    def __init__(self, stream: trio.abc.Stream, max_header_bytes: int = 60 * 1024) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self._response: h11.Response | None = None

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next_event(self) -> h11.Event:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamReset(f"endpoint sent malformed HTTP: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamReset(f"connection to endpoint reset: {exc}") from exc
            self.conn.receive_data(bytes(data))

    async def send_request(self, head: RequestHead, body: AsyncIterable[bytes]) -> None:
        headers = (("host", head.authority), *forwardable(head.headers))
        try:
            await self._send(h11.Request(method=head.method, target=head.path, headers=_encode(headers)))
            async for chunk in body:
                if chunk:
                    await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamReset(f"connection to endpoint reset while sending: {exc}") from exc

    async def receive_response(self) -> ResponseHead:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                self._response = event
                return ResponseHead(event.status_code, _decode(event.headers))
            raise UpstreamReset("endpoint closed the connection before answering")

    async def response_body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise UpstreamReset("endpoint closed the connection in the middle of the response")

    @property
    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    async def aclose(self) -> None:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await self.stream.aclose()
