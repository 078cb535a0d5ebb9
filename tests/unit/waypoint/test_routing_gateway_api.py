"""What the route model gained for Gateway API routes (also a VirtualService's): `rewrite.uriRegexRewrite`,
and a redirect's `scheme`, `port` and `derivePort` (pure: the decision step)."""

from __future__ import annotations

import random

from waypoint_resources import fq, l7, table_with

from waypoint.l7.model import ClientInfo, RequestHead
from waypoint.l7.routing import decide

CLIENT = ClientInfo("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage", "10.244.1.10:40000", "10.96.0.11:9080")


def decide_for(http: list[dict], path: str) -> object:
    table = table_with(l7("VirtualService", "reviews", {"hosts": ["reviews"], "http": http}, [fq("reviews")]))
    return decide(table, RequestHead("GET", path, "reviews:9080"), CLIENT, random.Random(1))


def rewritten(match: str, rewrite: str, path: str) -> str:
    d = decide_for([{"rewrite": {"uriRegexRewrite": {"match": match, "rewrite": rewrite}},
                     "route": [{"destination": {"host": "reviews"}}]}], path)
    return d.request.path  # type: ignore[attr-defined]


def test_uri_regex_rewrite_replaces_the_matches_and_keeps_the_query() -> None:
    assert rewritten("^/api(/.*)?$", "/v2\\1", "/api/x?q=1") == "/v2/x?q=1"
    assert rewritten("^/api(/.*)?$", "/v2\\1", "/api") == "/v2"
    assert rewritten("^/api(/.*)?$", "\\1", "/api") == "/"  # never an empty path
    assert rewritten("-", "_", "/a-b-c") == "/a_b_c"
    assert rewritten("^/nomatch$", "/x", "/keep") == "/keep"


def redirect_location(redirect: dict, path: str = "/p") -> str:
    d = decide_for([{"redirect": redirect}], path)
    reply = d.local_reply  # type: ignore[attr-defined]
    return dict(reply.headers)["location"]


def test_redirect_scheme_and_port() -> None:
    assert redirect_location({"uri": "/n"}) == "http://reviews:9080/n"
    assert redirect_location({"scheme": "https", "port": 443}) == "https://reviews/p"
    assert redirect_location({"port": 8080, "authority": "example.com"}) == "http://example.com:8080/p"
    assert redirect_location({"scheme": "https", "port": 8443}) == "https://reviews:8443/p"
    assert redirect_location({"scheme": "https", "derivePort": "FROM_PROTOCOL_DEFAULT"}) == "https://reviews/p"
    assert redirect_location({"scheme": "https"}) == "https://reviews:9080/p"  # the request's port kept
