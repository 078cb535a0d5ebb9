"""What the request pipeline sees of HTTP, the same for HTTP/1.1 and HTTP/2.

Downstream, a server connection hands each request to the pipeline as a `ServerExchange`: the head, the
body as chunks, and the ways to answer (head, data, end, or reset mid-response).  Upstream, an
`UpstreamConnection` sends one request and gives back its response; it says afterwards whether its
connection can carry another request (keep-alive).  Over HTTP/2 it is one stream of a shared connection
(`waypoint.http.http2_client.Http2Stream`), which also carries trailers.  A server exchange that can carry
trailers (HTTP/2) is a `TrailerExchange`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Protocol, runtime_checkable

from waypoint.l7.model import Headers, RequestHead, ResponseHead


class ServerExchange(Protocol):
    head: RequestHead

    def body(self) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk, ending with the message."""
        ...

    @property
    def response_started(self) -> bool: ...

    async def send_head(self, head: ResponseHead, end: bool = False) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    async def reset(self) -> None:
        """Abort the response (HTTP/2: RST_STREAM; HTTP/1.1: close the connection)."""
        ...


@runtime_checkable
class TrailerExchange(Protocol):
    """A server exchange with trailers both ways (HTTP/2; HTTP/1.1 here has none)."""

    @property
    def request_trailers(self) -> Headers:
        """The request's trailers, once its body has ended."""
        ...

    async def send_trailers(self, trailers: Headers) -> None:
        """End the response with trailers (instead of `end`)."""
        ...


Handler = Callable[[ServerExchange], Awaitable[None]]


class UpstreamConnection(Protocol):
    async def send_request(self, head: RequestHead, body: AsyncIterable[bytes]) -> None: ...

    async def receive_response(self) -> ResponseHead: ...

    def response_body(self) -> AsyncIterator[bytes]: ...

    @property
    def reusable(self) -> bool: ...

    async def aclose(self) -> None: ...


async def iterate(data: bytes) -> AsyncIterator[bytes]:
    """A body that is already in memory, as an async iterator."""
    if data:
        yield data
