"""The pure request steps before routing: path normalization and the forwarding headers."""

from __future__ import annotations

import pytest

from waypoint.l7.forwarding import forwarding_headers, remote_ip
from waypoint.l7.model import RequestHead
from waypoint.l7.normalize import NormalizationError, normalize_path, normalize_request


@pytest.mark.parametrize(("raw", "normal"), [
    ("/", "/"), ("/reviews/1", "/reviews/1"), ("/a/.well-known/x", "/a/.well-known/x"),
    ("//a///b", "/a/b"), ("/a/./b/../c", "/a/c"), ("/../../a", "/a"), ("/a/..", "/"), ("/a/.", "/a/"),
    ("/%41%2d%5F%7e%30", "/A-_~0"), ("/%2e%2E/a", "/a"), ("/%7b%7D", "/%7B%7D"), ("/a\\b", "/a/b"),
    ("/caf\xe9", "/caf%E9"), ("/a b", "/a%20b"),
])
def test_paths_are_normalized_as_envoy_does(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", ["a", "", "/%", "/%g0", "/%00", "/a%2fb", "/a%5Cb", "/a\x7f", "/a\nb"])
def test_paths_that_cannot_be_normalized_are_refused(raw: str) -> None:
    with pytest.raises(NormalizationError):
        normalize_path(raw)


def test_requests_keep_their_query_and_lose_their_fragment() -> None:
    head = normalize_request(RequestHead("GET", "//a/../b?x=/../%2F#frag", "reviews"))
    assert (head.path, head.authority) == ("/b?x=/../%2F", "reviews")
    head = normalize_request(RequestHead("GET", "https://ratings:9080?x", "reviews"))
    assert (head.path, head.authority) == ("/?x", "ratings:9080")
    assert normalize_request(RequestHead("OPTIONS", "*", "reviews")).path == "*"
    for bad in (RequestHead("Get", "/", "r"), RequestHead("GET", "ftp://h/x", "r"), RequestHead("GET", "http://u@h/", "r")):
        with pytest.raises(NormalizationError):
            normalize_request(bad)


def test_forwarding_headers_and_the_trusted_client_address() -> None:
    spoofed = (("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("x-forwarded-for", "3.3.3.3"), ("forwarded", "for=9.9.9.9"),
               ("x-forwarded-client-cert", "URI=spiffe://x/ns/a/sa/b"), ("accept", "*/*"))
    out = dict(forwarding_headers(spoofed, source_ip="10.0.0.7", peer_identity="spiffe://td/ns/n/sa/s",
                                  local_identity="spiffe://td/ns/n/sa/waypoint"))
    assert out == {"accept": "*/*", "x-forwarded-for": "1.1.1.1,2.2.2.2,3.3.3.3,10.0.0.7", "x-forwarded-proto": "http",
                   "x-forwarded-client-cert": "By=spiffe://td/ns/n/sa/waypoint;URI=spiffe://td/ns/n/sa/s"}
    assert "x-forwarded-client-cert" not in dict(forwarding_headers(spoofed, source_ip="10.0.0.7", peer_identity=""))
    chain = tuple(out.items())
    assert remote_ip(chain, "10.0.0.7") == "10.0.0.7"  # no trusted hop: the verified address
    assert remote_ip(chain, "10.0.0.7", trusted_hops=1) == "3.3.3.3"
    assert remote_ip(chain, "10.0.0.7", trusted_hops=3) == "1.1.1.1"
    assert remote_ip(chain, "10.0.0.7", trusted_hops=4) == "10.0.0.7"  # too short
    assert remote_ip((("x-forwarded-for", "junk,10.0.0.7"),), "10.0.0.7", trusted_hops=1) == "10.0.0.7"
