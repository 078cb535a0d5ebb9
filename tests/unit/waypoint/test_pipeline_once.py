"""What the request pipeline computes once and keeps (per tunnel, per head, per route table) gives exactly
what computing it again would: header lookups, the client's address parts, resolved clusters, label keys,
request ids, the access-log line, and the upstream pool's keys per client address."""

from __future__ import annotations

import random
import uuid
from dataclasses import fields, replace

import pytest
import trio
import trio.testing
from waypoint_resources import fq, l7, table_with

from mesh.bounded import BoundedMemo
from waypoint.accesslog import AccessRecord, format_line, format_values
from waypoint.errors import ConnectFailure
from waypoint.l7.jwt import AuthnResult
from waypoint.l7.model import ClientInfo, Endpoint, RequestHead, header, without
from waypoint.l7.routing import CLUSTER_CACHE_SIZE, ClusterCache, LocalReply, decide
from waypoint.proxy import new_request_id
from waypoint.upstream.pool import ConnectionPool

REVIEWS = ClientInfo("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage", "10.244.1.10:40000",
                     "10.96.0.11:9080")


def test_a_heads_header_lookup_is_the_first_value_and_follows_its_own_headers() -> None:
    head = RequestHead("GET", "/a?b=1", "reviews", (("x-a", "1"), ("x-b", "2"), ("x-a", "3")))
    assert head.header("x-a") == "1" == header(head.headers, "x-a")
    assert head.header("x-missing") is None
    changed = head.replace(headers=(("x-a", "9"),))
    assert changed.header("x-a") == "9" and changed.header("x-b") is None
    assert head.header("x-b") == "2"  # the original keeps its own index
    assert (head.uri_path, head.query) == ("/a", "b=1")
    assert RequestHead("GET", "/a", "r").query == ""
    assert head == RequestHead("GET", "/a?b=1", "reviews", (("x-a", "1"), ("x-b", "2"), ("x-a", "3")))


def test_without_takes_names_in_any_case_or_a_prepared_set() -> None:
    headers = (("x-a", "1"), ("x-b", "2"), ("x-c", "3"))
    assert without(headers, ["X-A", "x-c"]) == (("x-b", "2"),)
    assert without(headers, frozenset({"x-a", "x-c"})) == (("x-b", "2"),)


@pytest.mark.parametrize("source,destination,ip,dip,dport", [
    ("10.0.0.1:5000", "10.96.0.1:80", "10.0.0.1", "10.96.0.1", 80),
    ("[fd00::1]:5000", "[fd00::2]:8080", "fd00::1", "fd00::2", 8080),
    ("", "", "", "", 0),
    ("10.0.0.1", "10.96.0.1", "10.0.0.1", "10.96.0.1", 0),
])
def test_client_address_parts(source: str, destination: str, ip: str, dip: str, dport: int) -> None:
    client = ClientInfo("spiffe://td/ns/prod/sa/web", source, destination)
    for _ in range(2):  # (the second time from what the first kept)
        assert (client.source_ip, client.destination_ip, client.destination_port) == (ip, dip, dport)
        assert (client.principal, client.namespace) == ("td/ns/prod/sa/web", "prod")
    assert client == ClientInfo("spiffe://td/ns/prod/sa/web", source, destination)
    assert hash(client) == hash(ClientInfo("spiffe://td/ns/prod/sa/web", source, destination))


def test_an_endpoints_kept_hash_is_its_fields_hash() -> None:
    a = Endpoint("10.0.0.1", 80, name="web", labels=(("app", "web"),))
    b = Endpoint("10.0.0.1", 80, name="web", labels=(("app", "web"),))
    c = replace(a, port=81)
    assert a == b and hash(a) == hash(b) == hash(a)
    assert hash(a) == hash(tuple(getattr(a, f.name) for f in fields(a)))
    assert a != c and {a: 1, c: 2}[b] == 1
    assert c.key == "10.0.0.1:81" and a.key == "10.0.0.1:80"


def vs(name: str, spec: dict) -> object:
    return l7("VirtualService", name, spec, [fq(h) for h in spec["hosts"]])


def test_decisions_with_a_cluster_cache_are_those_without() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"match": [{"uri": {"prefix": "/missing"}}], "route": [{"destination": {"host": "nowhere"}}]},
        {"mirror": {"host": "reviews", "subset": "v3"}, "mirrorPercentage": {"value": 100.0},
         "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                   {"destination": {"host": "reviews", "subset": "v3"}, "weight": 50}]}]}))
    cache: ClusterCache = BoundedMemo(CLUSTER_CACHE_SIZE)
    heads = [RequestHead("GET", "/r", "reviews:9080", (("end-user", "jason"),)),
             RequestHead("GET", "/missing", "reviews:9080"), RequestHead("GET", "/r", "reviews:9080")]
    for _ in range(20):
        for h in heads:
            cached = decide(table, h, REVIEWS, random.Random(3), cache)  # type: ignore[arg-type]
            fresh = decide(table, h, REVIEWS, random.Random(3))  # type: ignore[arg-type]
            assert cached == fresh
    assert isinstance(decide(table, heads[1], REVIEWS, random.Random(3), cache).local_reply,  # type: ignore[arg-type]
                      LocalReply)
    assert 1 < len(cache) <= 4  # v1, v2, v3 and the unknown host: each resolved once


def test_authn_result_changes_headers_only_when_it_would() -> None:
    headers = (("authorization", "Bearer t"), ("x-a", "1"))
    assert not AuthnResult(True).changes_headers and AuthnResult(True).apply(headers) == headers
    stripping = AuthnResult(True, strip_header="authorization")
    assert stripping.changes_headers and stripping.apply(headers) == (("x-a", "1"),)
    assert AuthnResult(True, add=(("x-claim", "c"),)).changes_headers


def test_request_ids_are_random_version_4_uuids() -> None:
    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in list(ids)[:300]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_format_values_is_format_line_of_the_same_record() -> None:
    values: dict[str, object] = {f.name: f"v-{f.name}\"\n" if f.type == "str" else 7 for f in fields(AccessRecord)}
    values["duration_ms"] = 1.25
    assert format_values(values) == format_line(AccessRecord(**values))  # type: ignore[arg-type]
    assert format_values(dict(reversed(list(values.items())))) == format_line(AccessRecord(**values))  # type: ignore[arg-type]


class _Conn:
    """An upstream connection that records being closed (the pool only asks these two things of it)."""

    reusable = True

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


def test_a_retired_pool_keeps_nothing_opened_before() -> None:
    class Opening:
        async def connect(self, endpoint: Endpoint, **_: str) -> trio.abc.HalfCloseableStream:
            return trio.testing.memory_stream_pair()[0]  # type: ignore[return-value]

    async def main() -> None:
        pool = ConnectionPool(upstream=Opening())  # type: ignore[arg-type]
        ep = Endpoint("10.0.0.1", 80)
        first, reused = await pool.acquire(ep, "HTTP/1.1", 1.0, client="10.1.0.1")
        await pool.release(ep, "HTTP/1.1", first, client="10.1.0.1")
        assert not reused and pool.idle_count() == 1
        in_use, reused = await pool.acquire(ep, "HTTP/1.1", 1.0, client="10.1.0.1")
        assert reused and in_use is first
        idle, _ = await pool.acquire(ep, "HTTP/1.1", 1.0, client="10.1.0.1")  # a second one, opened
        await pool.release(ep, "HTTP/1.1", idle, client="10.1.0.1")
        pool.retire()  # a new route table
        assert pool.idle_count() == 0
        await pool.release(ep, "HTTP/1.1", in_use, client="10.1.0.1")  # given back after: closed, not kept
        assert pool.idle_count() == 0
        fresh, reused = await pool.acquire(ep, "HTTP/1.1", 1.0, client="10.1.0.1")
        assert not reused and fresh is not first and pool.opened == 3
        await pool.release(ep, "HTTP/1.1", fresh, client="10.1.0.1")
        assert pool.idle_count() == 1  # opened under the new table: kept
        await pool.aclose()

    trio.run(main)


def test_pooled_connections_are_kept_per_client_address_and_expire_when_idle() -> None:
    class Refusing:
        async def connect(self, endpoint: Endpoint, **_: str) -> None:
            raise ConnectFailure(f"would open a new connection to {endpoint.key}")

    async def main() -> None:
        now = [0.0]
        pool = ConnectionPool(upstream=Refusing(), idle_timeout=60.0, clock=lambda: now[0])  # type: ignore[arg-type]
        ep1, ep2 = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)
        conns = {(ep, client): _Conn() for ep in (ep1, ep2) for client in ("10.1.0.1", "10.1.0.2")}
        for (ep, client), conn in conns.items():
            await pool.release(ep, "HTTP/1.1", conn, client=client)  # type: ignore[arg-type]
        assert pool.idle_count() == 4
        # a client address gets its own connections back, and never another client's
        again, reused = await pool.acquire(ep1, "HTTP/1.1", 1.0, client="10.1.0.2")
        assert reused and again is conns[(ep1, "10.1.0.2")]
        with pytest.raises(ConnectFailure):
            await pool.acquire(ep1, "HTTP/1.1", 1.0, client="10.1.0.3")
        now[0] = 30.0
        await pool.release(ep1, "HTTP/1.1", again, client="10.1.0.2")  # idle again from 30 s
        await pool.expire()  # nothing is past the idle timeout yet
        assert pool.idle_count() == 4 and not any(c.closed for c in conns.values())
        now[0] = 61.0
        await pool.expire()  # what went idle at 0 s is closed, whether or not its client comes back
        assert pool.idle_count() == 1 and not again.closed
        assert [c.closed for key, c in conns.items() if key != (ep1, "10.1.0.2")] == [True, True, True]
        now[0] = 91.0
        await pool.expire()
        assert pool.idle_count() == 0 and again.closed and not pool._idle  # no empty keys left behind
        # a client with many requests in flight at once gets all of their connections back afterwards
        burst = [_Conn() for _ in range(200)]
        for conn in burst:
            await pool.release(ep1, "HTTP/1.1", conn, client="10.1.0.1")  # type: ignore[arg-type]
        assert pool.idle_count() == 200 and not any(c.closed for c in burst)
        await pool.aclose()

    trio.run(main)
