"""Key sets fetched from `jwksUri`, cached with a refresh interval (the I/O side of `waypoint.l7.jwt`).

The fetch function is injected (tests serve a key set from a local server); the default speaks plain
HTTP/1.1 or HTTPS with the system trust store.  A failed refresh keeps the last good key set.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import h11
import jwt as pyjwt
import trio

from waypoint.errors import JwksError

Fetch = Callable[[str], Awaitable[bytes]]
MAX_JWKS_BYTES = 1 << 20


async def fetch_url(url: str, timeout: float = 5.0) -> bytes:
    """GET `url` and return the body of a 200 answer, else raise `JwksError`."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname or "", port)
            if parts.scheme == "https":
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parts.hostname)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=[
                    ("Host", parts.netloc), ("Accept", "application/json"), ("Connection", "close")])) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                status, body = 0, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_JWKS_BYTES:
                            raise JwksError(f"key set at {url} is larger than {MAX_JWKS_BYTES} bytes")
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
    except (OSError, trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError) as exc:
        raise JwksError(f"cannot fetch the key set at {url}: {exc or type(exc).__name__}") from exc
    if status != 200:
        raise JwksError(f"fetching the key set at {url} answered {status}")
    return body


class JwksCache:
    """Key sets by URI.  `ensure(uri)` fetches when missing or older than `refresh`; `get` never blocks."""

    def __init__(self, fetch: Fetch = fetch_url, refresh: float = 20 * 60.0,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._fetch = fetch
        self._refresh = refresh
        self._clock = clock
        self._sets: dict[str, tuple[float, pyjwt.PyJWKSet]] = {}  # parsed once per fetch
        self._locks: dict[str, trio.Lock] = {}
        self.errors: dict[str, str] = {}

    def get(self, uri: str) -> pyjwt.PyJWKSet | None:
        hit = self._sets.get(uri)
        return hit[1] if hit else None

    async def ensure(self, uri: str) -> None:
        lock = self._locks.setdefault(uri, trio.Lock())
        async with lock:
            hit = self._sets.get(uri)
            if hit is not None and self._clock() - hit[0] < self._refresh:
                return
            try:
                data = json.loads(await self._fetch(uri))
                if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
                    raise JwksError(f"{uri} did not return a JSON Web Key Set")
                keyset = pyjwt.PyJWKSet.from_dict(data)
            except (JwksError, ValueError, pyjwt.PyJWTError) as exc:
                self.errors[uri] = str(exc)
                return
            self.errors.pop(uri, None)
            self._sets[uri] = (self._clock(), keyset)
