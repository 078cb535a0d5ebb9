"""Routing decisions for the bookinfo examples (no sockets: the decision step is pure)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from waypoint_resources import fq, l7, table_with

from waypoint.l7.model import ClientInfo, RequestHead
from waypoint.l7.routing import decide

REVIEWS = ClientInfo("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage", "10.244.1.10:40000", "10.96.0.11:9080")
RATINGS = ClientInfo("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews", "10.244.1.12:40000", "10.96.0.12:9080")


def head(path: str = "/reviews/0", method: str = "GET", authority: str = "reviews:9080", **headers: str) -> RequestHead:
    return RequestHead(method, path, authority, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


def vs(name: str, spec: dict) -> object:
    return l7("VirtualService", name, spec, [fq(h) for h in spec["hosts"]])


def weighted(w1: int, w2: int, s1: str = "v1", s2: str = "v3") -> object:
    return vs("reviews", {"hosts": ["reviews"], "http": [{"route": [
        {"destination": {"host": "reviews", "subset": s1}, "weight": w1},
        {"destination": {"host": "reviews", "subset": s2}, "weight": w2}]}]})


def subsets(table: object, client: ClientInfo, h: RequestHead, n: int, seed: int = 7) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(decide(table, h, client, rng).cluster.subset for _ in range(n))  # type: ignore[arg-type, union-attr]


@pytest.mark.parametrize("w1,w2", [(80, 20), (95, 5), (50, 50)])
def test_weighted_subsets_within_tolerance(w1: int, w2: int) -> None:
    table = table_with(weighted(w1, w2))
    counts = subsets(table, REVIEWS, head(), 2000)
    share = counts["v1"] / 2000
    # binomial standard deviation at n=2000 is at most 1.1%; allow 4 of them
    assert abs(share - w1 / 100) < 0.045, counts
    assert counts["v1"] + counts["v3"] == 2000


def test_all_to_v1_and_endpoints_are_the_subsets() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}))
    d = decide(table, head(), REVIEWS, random.Random(1))
    assert d.cluster is not None and d.cluster.subset == "v1"
    assert [e.name for e in d.cluster.endpoints] == ["reviews-v1"]
    assert d.cluster.endpoints[0].port == 9080


def test_end_user_jason_goes_to_v2_others_to_v1() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}))
    assert decide(table, head(end_user="jason"), REVIEWS, random.Random(1)).cluster.subset == "v2"  # type: ignore[union-attr]
    assert decide(table, head(end_user="json"), REVIEWS, random.Random(1)).cluster.subset == "v1"  # type: ignore[union-attr]
    assert decide(table, head(), REVIEWS, random.Random(1)).cluster.subset == "v1"  # type: ignore[union-attr]


def test_uri_prefix_new_goes_to_v2_and_regex_is_a_full_match() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/new"}}, {"uri": {"regex": "/v[0-9]+"}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"match": [{"uri": {"exact": "/exact"}}], "route": [{"destination": {"host": "reviews", "subset": "v3"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}))

    def sub(path: str) -> str:
        return decide(table, head(path), REVIEWS, random.Random(1)).cluster.subset  # type: ignore[union-attr]

    assert sub("/new/reviews?x=1") == "v2"
    assert sub("/v12") == "v2"
    assert sub("/v12/more") == "v1"  # regex must match the whole path
    assert sub("/exact") == "v3"
    assert sub("/exact/") == "v1"
    assert sub("/old") == "v1"


def test_method_query_and_without_headers() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [
        {"match": [{"method": {"exact": "POST"}, "queryParams": {"debug": {"exact": "1"}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v3"}}]},
        {"match": [{"withoutHeaders": {"x-canary": {"exact": "no"}}, "headers": {"x-canary": {"prefix": ""}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}))
    r = random.Random(1)
    assert decide(table, head("/?debug=1", "POST"), REVIEWS, r).cluster.subset == "v3"  # type: ignore[union-attr]
    assert decide(table, head("/?debug=2", "POST"), REVIEWS, r).cluster.subset == "v1"  # type: ignore[union-attr]
    assert decide(table, head("/", x_canary="yes"), REVIEWS, r).cluster.subset == "v2"  # type: ignore[union-attr]
    assert decide(table, head("/", x_canary="no"), REVIEWS, r).cluster.subset == "v1"  # type: ignore[union-attr]


def test_no_virtual_service_routes_to_all_endpoints() -> None:
    bookinfo_table = table_with()
    d = decide(bookinfo_table, head(), REVIEWS, random.Random(1))  # type: ignore[arg-type]
    assert d.route_name == "default" and d.cluster is not None
    assert sorted(e.name for e in d.cluster.endpoints) == ["reviews-v1", "reviews-v2", "reviews-v3"]


def test_host_header_selects_service_when_destination_is_unknown() -> None:
    bookinfo_table = table_with()
    d = decide(bookinfo_table, head(authority="ratings"), ClientInfo(), random.Random(1))  # type: ignore[arg-type]
    assert d.service is not None and d.service.hostname == fq("ratings")
    d = decide(bookinfo_table, head(authority="nothing-here"), ClientInfo(), random.Random(1))  # type: ignore[arg-type]
    assert d.local_reply is not None and d.local_reply.status == 404 and d.local_reply.flag == "NR"


def test_no_route_matches_is_404() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/only"}}], "route": [{"destination": {"host": "reviews"}}]}]}))
    d = decide(table, head("/else"), REVIEWS, random.Random(1))
    assert d.local_reply is not None and (d.local_reply.status, d.local_reply.flag) == (404, "NR")


def test_ratings_delay_for_jason_is_7s_fixed() -> None:
    table = table_with(vs("ratings", {"hosts": ["ratings"], "http": [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "fault": {"delay": {"percentage": {"value": 100.0}, "fixedDelay": "7s"}},
         "route": [{"destination": {"host": "ratings", "subset": "v1"}}]},
        {"route": [{"destination": {"host": "ratings", "subset": "v1"}}]}]}))
    jason = head("/ratings/0", authority="ratings:9080", end_user="jason")
    assert decide(table, jason, RATINGS, random.Random(1)).fault.delay == 7.0
    assert decide(table, head("/ratings/0", authority="ratings:9080"), RATINGS, random.Random(1)).fault.delay is None


@pytest.mark.parametrize("percentage", [{"percentage": {"value": 0.1}}, {"percent": 10}])
def test_fault_delay_percentage_2s(percentage: dict) -> None:
    table = table_with(vs("ratings", {"hosts": ["ratings"], "http": [
        {"fault": {"delay": {"fixedDelay": "2s", **percentage}}, "route": [{"destination": {"host": "ratings"}}]}]}))
    rng = random.Random(3)
    n = 40000 if "percentage" in percentage else 4000
    delays = [decide(table, head("/", authority="ratings"), RATINGS, rng).fault.delay for _ in range(n)]
    hits = [x for x in delays if x is not None]
    expected = n * (0.001 if "percentage" in percentage else 0.10)
    assert set(hits) <= {2.0}
    assert abs(len(hits) - expected) < 4 * expected**0.5 + 2, (len(hits), expected)


@pytest.mark.parametrize("status,pct", [(400, 50.0), (500, 100.0)])
def test_fault_abort_with_percentage(status: int, pct: float) -> None:
    table = table_with(vs("ratings", {"hosts": ["ratings"], "http": [
        {"fault": {"abort": {"httpStatus": status, "percentage": {"value": pct}}},
         "route": [{"destination": {"host": "ratings", "subset": "v1"}}]}]}))
    rng = random.Random(5)
    aborts = [decide(table, head("/", authority="ratings"), RATINGS, rng).fault.abort_status for _ in range(2000)]
    share = sum(1 for a in aborts if a == status) / 2000
    assert abs(share - pct / 100) < 0.05
    assert set(aborts) <= {status, None}


def test_header_operations_rewrite_timeout_retries_and_mirror() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [{
        "match": [{"uri": {"prefix": "/api"}}],
        "rewrite": {"uri": "/v2api"},
        "timeout": "1.5s",
        "retries": {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "gateway-error,connect-failure"},
        "headers": {"request": {"set": {"x-set": "1"}, "add": {"x-add": "a"}, "remove": ["x-drop"]},
                    "response": {"set": {"x-resp": "r"}}},
        "mirror": {"host": "reviews", "subset": "v3"}, "mirrorPercentage": {"value": 100.0},
        "route": [{"destination": {"host": "reviews", "subset": "v2"},
                   "headers": {"request": {"set": {"x-dest": "v2"}}}}]}]}))
    d = decide(table, head("/api/list?q=1", x_drop="gone", x_add="first"), REVIEWS, random.Random(1))
    assert d.request is not None
    assert d.request.path == "/v2api/list?q=1"
    h = d.request.headers
    assert ("x-set", "1") in h and ("x-dest", "v2") in h and ("x-add", "first") in h and ("x-add", "a") in h
    assert all(k != "x-drop" for k, _ in h)
    assert d.timeout == 1.5
    assert (d.retries.attempts, d.retries.per_try_timeout) == (3, 0.5)
    assert d.retries.retry_on == frozenset({"gateway-error", "connect-failure"})
    assert len(d.mirrors) == 1 and d.mirrors[0].cluster.subset == "v3"
    assert d.mirrors[0].request.authority == "reviews-shadow:9080"
    assert any(("x-resp", "r") in ops.set for ops in d.response_ops)


def test_mirror_percentage_is_sampled() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [{
        "mirror": {"host": "reviews", "subset": "v3"}, "mirrorPercentage": {"value": 25.0},
        "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}))
    rng = random.Random(9)
    n = sum(len(decide(table, head(), REVIEWS, rng).mirrors) for _ in range(2000))
    assert abs(n / 2000 - 0.25) < 0.04


def test_default_retry_policy_is_istios() -> None:
    table = table_with(vs("reviews", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}))
    d = decide(table, head(), REVIEWS, random.Random(1))
    assert d.retries.attempts == 2 and "connect-failure" in d.retries.retry_on and d.timeout is None


def test_workload_addressed_traffic_goes_to_that_workload() -> None:
    bookinfo_table = table_with()
    client = ClientInfo("", "10.244.1.10:1", "10.244.1.12:9080")
    d = decide(bookinfo_table, head(), client, random.Random(1))  # type: ignore[arg-type]
    assert d.cluster is not None and [e.key for e in d.cluster.endpoints] == ["10.244.1.12:9080"]
