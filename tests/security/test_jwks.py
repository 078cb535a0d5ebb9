"""Item 8: key sets are fetched and refreshed in the background, one task per `jwksUri` with a refresh
interval and capped backoff; failures are remembered; a request never waits for a fetch: without keys
for its issuer it is answered 401 at once, saying why.  `timeout` of a JWT rule bounds each fetch.  A
`jwksUri` over plain http is a configuration error unless the waypoint is started to allow it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.security.waypoint_helpers import (
    GATEWAY,
    l7,
    request,
    reviews_table,
    run,
    running_proxy,
    start_backend,
)
from tests.unit.waypoint.waypoint_resources import bookinfo
from waypoint.config import compile_table
from waypoint.errors import JwksError
from waypoint.jwks import JwksCache
from waypoint.proxy import WaypointProxy
from waypoint.upstream.pool import TcpUpstream

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_TOKEN = (FIXTURES / "istio-demo.jwt").read_text().strip()
DEMO_JWKS = (FIXTURES / "istio-demo-jwks.json").read_bytes()
ISSUER = "testing@secure.istio.io"
URI = "https://keys.example/jwks.json"


def _ra(**extra: object) -> Any:
    return l7("RequestAuthentication", "jwt", {"targetRefs": GATEWAY, "jwtRules": [
        {"issuer": ISSUER, "jwksUri": URI, **extra}]})


def test_unreachable_jwks_issuer_fails_closed_at_once() -> None:
    calls: list[str] = []

    async def hanging(uri: str, timeout: float = 5.0) -> bytes:
        calls.append(uri)
        await trio.sleep_forever()
        raise AssertionError

    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            cache = JwksCache(fetch=hanging)
            async with running_proxy(reviews_table(backend.port, _ra()), jwks=cache) as (_, front, _log, _n):
                answers: list[tuple[int, bytes]] = []

                async def one() -> None:
                    with trio.fail_after(1.0):  # never waits for the issuer
                        head, body = await request(front.port, "/", headers=(("authorization", f"Bearer {DEMO_TOKEN}"),))
                    answers.append((head.status, body))

                async with trio.open_nursery() as clients:
                    for _ in range(5):
                        clients.start_soon(one)
                assert [status for status, _ in answers] == [401] * 5
                assert all(ISSUER.encode() in body and URI.encode() in body for _, body in answers), answers[0]
                head, _ = await request(front.port, "/")  # no token: not authenticated, not refused
                assert head.status == 200
            n.cancel_scope.cancel()
    run(main)


def test_jwks_failures_are_remembered_not_refetched_per_request() -> None:
    calls: list[str] = []

    async def refused(uri: str, timeout: float = 5.0) -> bytes:
        calls.append(uri)
        raise JwksError(f"cannot fetch the key set at {uri}: connection refused")

    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            async with running_proxy(reviews_table(backend.port, _ra()), jwks=JwksCache(fetch=refused)) as (
                    _, front, _log, _n):
                for _ in range(5):
                    head, _body = await request(front.port, "/", headers=(("authorization", f"Bearer {DEMO_TOKEN}"),))
                    assert head.status == 401
                assert len(calls) <= 2, calls  # the background try (and perhaps its retry), not one per request
            n.cancel_scope.cancel()
    run(main)


def test_jwks_are_fetched_and_refreshed_in_the_background_with_capped_backoff() -> None:
    fetched: list[tuple[float, float]] = []  # (when, timeout)
    failing = [True]

    async def fetch(uri: str, timeout: float = 5.0) -> bytes:
        fetched.append((trio.current_time(), timeout))
        if failing[0]:
            raise JwksError(f"cannot fetch the key set at {uri}: connection refused")
        return DEMO_JWKS

    async def main() -> None:
        workloads, services = bookinfo()
        table = compile_table("bookinfo/waypoint", workloads, services, [_ra(timeout="2s")]).table
        cache = JwksCache(fetch=fetch, refresh=600.0)
        proxy = WaypointProxy(TcpUpstream(), table, jwks=cache)
        async with trio.open_nursery() as n:
            n.start_soon(proxy.run)
            await trio.sleep(300)
            starts = [t for t, _ in fetched]
            gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
            assert 5 <= len(starts) <= 20, starts  # retried, with backoff, without any request
            assert gaps == sorted(gaps) and max(gaps) <= 60.0, gaps
            assert {t for _, t in fetched} == {2.0}  # the rule's timeout
            assert cache.get(URI) is None and "connection refused" in cache.unavailable(URI)
            failing[0] = False
            await trio.sleep(61)
            assert cache.get(URI) is not None
            count, fresh_at = len(fetched), fetched[-1][0]
            await trio.sleep_until(fresh_at + 599)
            assert len(fetched) == count  # fresh keys are kept for the refresh interval
            await trio.sleep_until(fresh_at + 601)
            assert len(fetched) == count + 1
            # A refresh that fails keeps the last good keys.
            failing[0] = True
            await trio.sleep(601)
            assert cache.get(URI) is not None
            # A table without the rule stops the fetching.
            proxy.update(compile_table("bookinfo/waypoint", workloads, services, []).table)
            count = len(fetched)
            await trio.sleep(3600)
            assert len(fetched) == count
            n.cancel_scope.cancel()
    run(main, limit=100_000, clock=trio.testing.MockClock(autojump_threshold=0))


def test_jwks_fetch_is_bounded_by_the_rules_timeout() -> None:
    async def slow(uri: str, timeout: float = 5.0) -> bytes:
        await trio.sleep(3600)
        return DEMO_JWKS

    async def main() -> None:
        workloads, services = bookinfo()
        table = compile_table("bookinfo/waypoint", workloads, services, [_ra(timeout="3s")]).table
        cache = JwksCache(fetch=slow)
        async with trio.open_nursery() as n:
            n.start_soon(WaypointProxy(TcpUpstream(), table, jwks=cache).run)
            await trio.sleep(3.5)
            assert "3s" in cache.unavailable(URI), cache.unavailable(URI)
            n.cancel_scope.cancel()
    run(main, limit=100_000, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("allow", [False, True])
def test_plain_http_jwks_uri_is_refused_unless_allowed(allow: bool) -> None:
    workloads, services = bookinfo()
    ra = l7("RequestAuthentication", "jwt", {"targetRefs": GATEWAY, "jwtRules": [
        {"issuer": ISSUER, "jwksUri": "http://keys.example/jwks.json"}]})
    opt_in = {"allow_http_jwks": True} if allow else {}  # the default refuses
    result = compile_table("bookinfo/waypoint", workloads, services, [ra], **opt_in)
    if allow:
        assert not result.errors and len(result.table.jwt_rules) == 1
    else:
        assert len(result.errors) == 1
        message = str(result.errors[0])
        assert "RequestAuthentication bookinfo/jwt" in message and "http://keys.example/jwks.json" in message
        assert "https" in message and "--allow-http-jwks" in message


def test_jwks_unavailable_says_why() -> None:
    cache = JwksCache()
    cache.want({URI: 5.0})
    assert "not fetched yet" in cache.unavailable(URI)
    assert "not configured" in cache.unavailable("https://other.example/jwks.json")
