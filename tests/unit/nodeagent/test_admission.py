"""The inbound decision on hand-made resources: a CONNECT (or a plaintext connection) and the view in,
`Admit` or `Refusal` out, before anything is answered."""

from __future__ import annotations

import pytest
from agent_resources import SLEEP, WEB, identity, pod_of, view

from mesh.hbone.headers import Authority
from mesh.hbone.server import InboundRequest
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.metrics import FailureReason, ResponseFlag
from nodeagent.proxy.admission import (
    Admit,
    InboundConnection,
    Refusal,
    decide,
    from_connect,
    original_source,
    plaintext,
)

WEB2 = WEB[1]  # 10.244.2.3 on node-2: the pod whose agent decides
POD = pod_of(WEB2)
SLEEP_ID = identity("sleep")


def connect(authority: str, *, peer: SpiffeId | None = SLEEP_ID, peer_address: str = "10.244.1.2:51000",
            forwarded_for: str | None = "10.244.1.2:40112") -> InboundRequest:
    host, _, port = authority.rpartition(":")
    return InboundRequest(stream_id=1, authority=Authority(host.strip("[]"), int(port)), headers=(), peer=peer,
                          peer_address=peer_address, forwarded_for=forwarded_for, forwarded_host=None)


def policy(name: str, action: int, *matches: pb.Match, ns: str = "default") -> pb.Authorization:
    rules = [pb.Rule(clauses=[pb.Clause(matches=list(matches))])]
    return pb.Authorization(name=name, namespace=ns, scope=pb.NAMESPACE, action=action, rules=rules)


DENY_SLEEP = policy("deny-sleep", pb.DENY, pb.Match(principals=[pb.StringMatch(exact="cluster.local/ns/default/sa/sleep")]))
STRICT = policy("strict", pb.DENY, pb.Match(not_principals=[pb.StringMatch(presence=True)]))
ALLOW_OTHERS = policy("allow-others", pb.ALLOW, pb.Match(principals=[pb.StringMatch(exact="cluster.local/ns/x/sa/y")]))


# -- the facts, from the CONNECT -------------------------------------------------------------------------


def test_the_source_is_the_connections_own_address_and_forwarded_gives_only_its_port() -> None:
    conn = from_connect(connect("10.244.2.3:8080"))
    assert conn == InboundConnection("10.244.1.2", 40112, SLEEP_ID, Authority("10.244.2.3", 8080), hbone=True)
    # A Forwarded naming another address is the client's word: no port taken from it, no address either.
    assert from_connect(connect("10.244.2.3:8080", forwarded_for="10.9.9.9:1234")).source_ip == "10.244.1.2"
    assert from_connect(connect("10.244.2.3:8080", forwarded_for="10.9.9.9:1234")).source_port == 0
    assert from_connect(connect("10.244.2.3:8080", forwarded_for=None)).source_port == 0
    v6 = from_connect(connect("10.244.2.3:8080", peer_address="[fd00::2]:51000", forwarded_for="[fd00::2]:7"))
    assert (v6.source_ip, v6.source_port) == ("fd00::2", 7)


def test_plaintext_has_no_identity_and_targets_this_pod() -> None:
    assert plaintext(POD, ("10.244.2.9", 33000), 8080) == InboundConnection(
        "10.244.2.9", 33000, None, Authority("10.244.2.3", 8080))


# -- the decision ----------------------------------------------------------------------------------------


def test_admitted_to_the_application_on_the_port_asked_for() -> None:
    verdict = decide(view(SLEEP, WEB2), POD, from_connect(connect("10.244.2.3:8080")))
    assert isinstance(verdict, Admit)
    assert verdict.address == ("10.244.2.3", 8080)
    assert verdict.decision.allowed and verdict.decision.reason == "no policy applies"


def test_a_connect_for_another_address_is_a_bad_request() -> None:
    verdict = decide(view(SLEEP, WEB2), POD, from_connect(connect("10.244.3.3:8080")))
    assert verdict == Refusal(400, ResponseFlag.NO_ROUTE, "10.244.3.3:8080 is not this pod (10.244.2.3)",
                              FailureReason.BAD_REQUEST)


def test_a_pod_the_agent_no_longer_knows_is_refused() -> None:
    verdict = decide(view(SLEEP), POD, from_connect(connect("10.244.2.3:8080")))
    assert verdict == Refusal(503, ResponseFlag.NO_ROUTE, "this pod is no longer known to the agent",
                              FailureReason.UNKNOWN_DESTINATION)


def test_policy_deny_is_401_with_the_rbac_flag_and_the_deciding_policy() -> None:
    verdict = decide(view(SLEEP, WEB2, DENY_SLEEP), POD, from_connect(connect("10.244.2.3:8080")))
    assert isinstance(verdict, Refusal)
    assert (verdict.status, verdict.flag, verdict.failure) == (401, ResponseFlag.DENIED, FailureReason.DENIED)
    assert verdict.reason == "denied by default/deny-sleep"
    assert verdict.decision is not None and verdict.decision.policy == "default/deny-sleep"


def test_an_allow_policy_for_others_refuses_this_client() -> None:
    verdict = decide(view(SLEEP, WEB2, ALLOW_OTHERS), POD, from_connect(connect("10.244.2.3:8080")))
    assert isinstance(verdict, Refusal) and verdict.status == 401
    assert verdict.reason == "denied: no ALLOW policy matched (default/allow-others)"


@pytest.mark.parametrize(("conn", "admitted"), [
    (from_connect(connect("10.244.2.3:8080")), True),  # mutual TLS: has a principal
    (plaintext(POD, ("10.244.2.9", 33000), 8080), False),  # plaintext: STRICT refuses it
], ids=["hbone", "plaintext"])
def test_strict_mtls_refuses_plaintext_only(conn: InboundConnection, admitted: bool) -> None:
    verdict = decide(view(SLEEP, WEB2, STRICT), POD, conn)
    assert isinstance(verdict, Admit) is admitted
    if not admitted:
        assert verdict == Refusal(401, ResponseFlag.DENIED, "denied by default/strict", FailureReason.DENIED,
                                  verdict.decision)


def test_policies_of_another_namespace_do_not_apply() -> None:
    elsewhere = policy("deny-sleep", pb.DENY, *DENY_SLEEP.rules[0].clauses[0].matches, ns="prod")
    assert isinstance(decide(view(SLEEP, WEB2, elsewhere), POD, from_connect(connect("10.244.2.3:8080"))), Admit)


@pytest.mark.parametrize(("client", "expected"), [
    ("10.244.1.2", "10.244.1.2"),  # another pod's: kept, as Istio keeps it
    ("10.244.2.3", None),  # the pod's own address: connected from as the pod
    ("127.0.0.1", None), ("0.0.0.0", None), ("fd00::1", None), ("not an address", None), ("", None),
])
def test_the_application_sees_the_clients_address_when_it_can(client: str, expected: str | None) -> None:
    assert original_source(POD, client) == expected
    assert original_source(POD, client) == expected  # (asked again: `is_loopback`'s cached answer)
