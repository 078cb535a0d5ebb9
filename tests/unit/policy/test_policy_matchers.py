"""The one matcher: principals in both spellings, wildcards, namespaces, IP blocks; patterns as Istio's
text and as `StringMatch` messages mean the same."""

from __future__ import annotations

import pytest

from mesh.identity import SpiffeId
from mesh.policy.matchers import (
    any_namespace,
    any_principal,
    cidr,
    ip_in,
    namespace_matches,
    principal_forms,
    principal_match,
    principal_matches,
    string_match,
    string_matches,
)
from mesh.proto import discovery_pb2 as pb

SLEEP = SpiffeId("cluster.local", "default", "sleep")
SHORT = "cluster.local/ns/default/sa/sleep"
URI = "spiffe://cluster.local/ns/default/sa/sleep"


# --- Istio's spelling -> StringMatch ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("*", pb.StringMatch(presence=True)),
    ("cluster.local/*", pb.StringMatch(prefix="cluster.local/")),
    ("*/sa/sleep", pb.StringMatch(suffix="/sa/sleep")),
    ("default", pb.StringMatch(exact="default")),
])
def test_string_match_reads_istio_spelling(text: str, expected: pb.StringMatch) -> None:
    assert string_match(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    (URI, pb.StringMatch(exact=SHORT)),
    (SHORT, pb.StringMatch(exact=SHORT)),
    ("spiffe://cluster.local/ns/default/*", pb.StringMatch(prefix="cluster.local/ns/default/")),
    ("spiffe://*", pb.StringMatch(presence=True)),
    ("*/sa/sleep", pb.StringMatch(suffix="/sa/sleep")),
])
def test_principal_match_drops_the_scheme(text: str, expected: pb.StringMatch) -> None:
    assert principal_match(text) == expected


# --- principals --------------------------------------------------------------------------------------------

PRINCIPAL_CASES = [
    # (id, pattern as the user writes it, does it match sleep's identity)
    ("exact, Istio form", SHORT, True),
    ("exact, SPIFFE form", URI, True),
    ("exact, other sa", "cluster.local/ns/default/sa/web", False),
    ("exact, other sa, SPIFFE form", "spiffe://cluster.local/ns/default/sa/web", False),
    ("exact, other trust domain", "other.domain/ns/default/sa/sleep", False),
    ("prefix", "cluster.local/ns/default/*", True),
    ("prefix, SPIFFE form", "spiffe://cluster.local/ns/default/*", True),
    ("prefix, other ns", "cluster.local/ns/prod/*", False),
    ("prefix, other ns, SPIFFE form", "spiffe://cluster.local/ns/prod/*", False),
    ("suffix", "*/sa/sleep", True),
    ("suffix, other sa", "*/sa/web", False),
    ("suffix carrying the scheme is anchored to the whole URI", "*spiffe://cluster.local/ns/default/sa/sleep", True),
    ("suffix carrying the scheme, other trust domain", "*spiffe://local/ns/default/sa/sleep", False),
    ("any", "*", True),
    ("any, SPIFFE form", "spiffe://*", True),
]


@pytest.mark.parametrize(("pattern", "expected"), [c[1:] for c in PRINCIPAL_CASES],
                         ids=[c[0] for c in PRINCIPAL_CASES])
@pytest.mark.parametrize("peer", [SLEEP, SHORT, URI], ids=["SpiffeId", "peer in Istio form", "peer as URI"])
def test_principal_in_either_spelling(pattern: str, expected: bool, peer: SpiffeId | str) -> None:
    assert principal_matches(pattern, peer) is expected
    # The projected message means the same as the text it came from.
    assert principal_matches(principal_match(pattern), peer) is expected


def test_a_message_that_keeps_the_scheme_is_compared_with_the_uri() -> None:
    assert principal_matches(pb.StringMatch(exact=URI), SLEEP)
    assert principal_matches(pb.StringMatch(prefix="spiffe://cluster.local/"), SHORT)
    assert not principal_matches(pb.StringMatch(prefix="spiffe://other/"), SLEEP)


@pytest.mark.parametrize("peer", [None, ""], ids=["None", "empty"])
def test_no_identity_matches_no_principal(peer: str | None) -> None:
    for pattern in ("*", SHORT, URI, "*/sa/sleep", "cluster.local/*", pb.StringMatch(presence=True)):
        assert not principal_matches(pattern, peer)
    assert not any_principal(["*"], peer)


def test_empty_or_false_string_match_matches_nothing() -> None:
    assert not principal_matches(pb.StringMatch(), SLEEP)
    assert not principal_matches(pb.StringMatch(presence=False), SLEEP)
    assert not string_matches(pb.StringMatch(), "x")


def test_any_principal_is_or() -> None:
    assert any_principal(["x/ns/a/sa/b", "*/sa/sleep"], SLEEP)
    assert any_principal([pb.StringMatch(exact="x/ns/a/sa/b"), pb.StringMatch(exact=URI)], SLEEP)
    assert not any_principal(["x/ns/a/sa/b", "spiffe://x/ns/a/sa/c"], SLEEP)
    assert not any_principal([], SLEEP)


def test_principal_forms() -> None:
    assert principal_forms(SLEEP) == (SHORT, URI)
    assert principal_forms(SHORT) == (SHORT, URI)
    assert principal_forms(URI) == (SHORT, URI)
    assert principal_forms(None) is None and principal_forms("") is None


# --- strings and namespaces ------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("default", "default", True),
    ("default", "defaults", False),
    ("def*", "default", True),
    ("*ult", "default", True),
    ("*ult", "prod", False),
    ("*", "default", True),
    ("*", "", False),
    ("default", None, False),
    ("*", None, False),
])
def test_string_matches_text_and_message_alike(pattern: str, value: str | None, expected: bool) -> None:
    assert string_matches(pattern, value) is expected
    assert string_matches(string_match(pattern), value) is expected


def test_namespaces() -> None:
    assert namespace_matches("default", "default")
    assert namespace_matches("prod-*", "prod-eu")
    assert not namespace_matches("prod-*", "default")
    assert any_namespace(["prod", "def*"], "default")
    assert not any_namespace(["prod", "legacy"], "default")
    # No identity, no namespace: every positive condition fails (a negative one therefore passes).
    assert not any_namespace(["*"], "") and not any_namespace(["*"], None)


# --- IP blocks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("blocks", "ip", "expected"), [
    (["10.244.1.0/24"], "10.244.1.3", True),
    (["10.244.2.0/24"], "10.244.1.3", False),
    (["10.244.1.3"], "10.244.1.3", True),  # a single address
    (["10.244.1.3"], "10.244.1.4", False),
    (["10.244.1.3/32"], "10.244.1.3", True),
    (["10.244.1.77/16"], "10.244.1.3", True),  # host bits are ignored
    (["192.168.0.0/16", "10.0.0.0/8"], "10.244.1.3", True),  # any block
    (["::/0"], "10.244.1.3", False),  # families do not mix
    (["0.0.0.0/0"], "fd00::1", False),
    (["fd00::/8"], "fd00::5", True),
    (["fd00::5"], "fd00::5", True),
    (["10.244.1.0/24"], "::ffff:10.244.1.3", True),  # v4-mapped is its IPv4 address
    (["fe80::/10"], "fe80::1%eth0", True),  # a zone is ignored
    (["not-a-cidr"], "10.244.1.3", False),  # a bad block matches nothing
    (["not-a-cidr", "10.0.0.0/8"], "10.244.1.3", True),
    (["10.0.0.0/8"], "not-an-ip", False),
    (["10.0.0.0/8"], "", False),
    (["10.0.0.0/8"], None, False),
    ([], "10.244.1.3", False),
])
def test_ip_in(blocks: list[str], ip: str | None, expected: bool) -> None:
    assert ip_in(blocks, ip) is expected


def test_cidr_is_canonical_and_refuses_garbage() -> None:
    assert cidr("10.244.1.77/16") == "10.244.0.0/16"
    assert cidr("10.244.1.3") == "10.244.1.3/32"
    assert cidr("fd00::5") == "fd00::5/128"
    with pytest.raises(ValueError):
        cidr("not-a-cidr")
