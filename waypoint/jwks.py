"""Key sets fetched from `jwksUri` in the background (the I/O side of `waypoint.l7.jwt`).

A request never waits for a fetch.  The proxy tells the cache which key sets its table needs
(`want(uri -> timeout)`), and `run()` keeps one task per `jwksUri`: it fetches, keeps the keys for the
refresh interval, then fetches again; a failed fetch is remembered (its reason, how many in a row) and
retried after a backoff that doubles up to a cap.  A failed refresh keeps the last good keys.  A request
whose issuer has no keys yet, or whose fetches keep failing, is answered 401 at once with `unavailable()`
as the reason: it fails closed, and cheaply.

Each fetch is bounded by the JWT rule's `timeout` (default 5 s).  The fetch function is injected (tests
serve a key set without a network); the default speaks HTTP/1.1 or HTTPS with the system trust store.
Plain http is refused when the configuration is compiled (`waypoint.config`), unless allowed there.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11
import trio

from waypoint.errors import JwksError
from waypoint.l7.jwt import DEFAULT_FETCH_TIMEOUT

if TYPE_CHECKING:
    import jwt as pyjwt

log = logging.getLogger("waypoint.jwks")

Fetch = Callable[[str, float], Awaitable[bytes]]  # (uri, timeout) -> body of a 200 answer
MAX_JWKS_BYTES = 1 << 20
DEFAULT_REFRESH = 20 * 60.0  # as istiod refreshes the key sets it inlines (PILOT_JWT_PUB_KEY_REFRESH_INTERVAL)
FIRST_RETRY = 1.0
MAX_RETRY = 60.0


async def fetch_url(url: str, timeout: float = DEFAULT_FETCH_TIMEOUT) -> bytes:
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


def parse_key_set(uri: str, body: bytes) -> pyjwt.PyJWKSet:
    import jwt as pyjwt  # loaded with the first JWT rule (see `waypoint.l7.jwt`)

    try:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise JwksError(f"{uri} did not return a JSON Web Key Set")
        return pyjwt.PyJWKSet.from_dict(data)
    except (ValueError, pyjwt.PyJWTError) as exc:
        raise JwksError(f"{uri} did not return a usable JSON Web Key Set: {exc}") from exc


@dataclass
class _Source:
    """One `jwksUri`: its keys and how its fetches are going."""

    timeout: float
    keys: pyjwt.PyJWKSet | None = None
    fetched_at: float | None = None
    error: str = ""
    failures: int = 0  # in a row
    started: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class JwksCache:
    """Key sets by URI, kept fresh by `run()`; `get` and `unavailable` never block."""

    def __init__(self, fetch: Fetch = fetch_url, refresh: float = DEFAULT_REFRESH, *,
                 first_retry: float = FIRST_RETRY, max_retry: float = MAX_RETRY,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self._fetch = fetch
        self._refresh = refresh
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._clock = clock
        self._sources: dict[str, _Source] = {}
        self._nursery: trio.Nursery | None = None

    # ---- what requests read ---------------------------------------------------------------------------

    def get(self, uri: str) -> pyjwt.PyJWKSet | None:
        src = self._sources.get(uri)
        return src.keys if src else None

    def unavailable(self, uri: str) -> str:
        """Why `uri` has no keys, in words for a 401 and a log line."""
        src = self._sources.get(uri)
        if src is None:
            return "the key set is not configured"
        if src.error:
            return f"{src.failures} fetch(es) in a row failed, the last: {src.error}"
        return "the key set is not fetched yet"

    # ---- what the configuration says -----------------------------------------------------------------

    def want(self, sources: Mapping[str, float]) -> None:
        """Keep exactly these key sets (`jwksUri` -> fetch timeout) fresh; stop fetching the others."""
        for uri in [u for u in self._sources if u not in sources]:
            self._sources.pop(uri).scope.cancel()
        for uri, timeout in sources.items():
            src = self._sources.setdefault(uri, _Source(timeout))
            src.timeout = timeout
        self._start_pending()

    # ---- the background --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch and refresh every wanted key set until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self._start_pending()
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for src in self._sources.values():
                    src.started = False
                    src.scope = trio.CancelScope()

    def _start_pending(self) -> None:
        if self._nursery is None:
            return
        for uri, src in self._sources.items():
            if not src.started:
                src.started = True
                self._nursery.start_soon(self._keep, uri, src)

    async def _keep(self, uri: str, src: _Source) -> None:
        with src.scope:
            retry = self._first_retry
            while True:
                if await self._fetch_once(uri, src):
                    retry = self._first_retry
                    await trio.sleep(self._refresh)
                else:
                    await trio.sleep(retry)
                    retry = min(retry * 2, self._max_retry)

    async def _fetch_once(self, uri: str, src: _Source) -> bool:
        timeout = src.timeout
        try:
            with trio.move_on_after(timeout) as deadline:
                body = await self._fetch(uri, timeout)
            if deadline.cancelled_caught:
                raise JwksError(f"fetching the key set at {uri} timed out after {timeout:g}s")
            keys = parse_key_set(uri, body)
        except JwksError as exc:
            src.error, src.failures = str(exc), src.failures + 1
            log.warning('{"event": "jwks fetch failed", "uri": "%s", "failures": %d, "keys_kept": %s}: %s',
                        uri, src.failures, "true" if src.keys is not None else "false", exc)
            return False
        src.keys, src.fetched_at, src.error, src.failures = keys, self._clock(), "", 0
        return True
