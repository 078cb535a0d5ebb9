"""The re-check of open inbound connections on hand-made resources: which remembered connections a new
view refuses (closed, with the refusal), which it leaves alone, and that a connection is forgotten when
its relay ends.  The ends are real `PlainEnd`s not connected to anything (closing one does nothing); the
connections for real, on sockets, are in tests/security/test_agent_policy_recheck.py."""

from __future__ import annotations

from agent_resources import SLEEP, WEB, identity, pod_of, view
from test_admission import DENY_SLEEP, STRICT, connect

from mesh.hbone.splice import PlainEnd
from nodeagent.metrics import FailureReason, ResponseFlag
from nodeagent.proxy.admission import from_connect, plaintext
from nodeagent.proxy.recheck import AdmittedConnections, recheck

WEB2 = WEB[1]
POD = pod_of(WEB2)


def test_a_view_that_now_denies_a_client_closes_its_connections_only() -> None:
    admitted = AdmittedConnections()
    sleep = from_connect(connect("10.244.2.3:8080"))
    other = from_connect(connect("10.244.2.3:8080", peer=identity("other"), peer_address="10.244.3.9:1"))
    with admitted.holding(POD, sleep, PlainEnd(), PlainEnd()) as denied, \
            admitted.holding(POD, other, PlainEnd(), PlainEnd()) as kept:
        assert recheck(view(SLEEP, WEB2), admitted) == []  # nothing changed: nothing closed
        assert recheck(view(SLEEP, WEB2, DENY_SLEEP), admitted) == [denied]
        assert denied.closed_by is not None and kept.closed_by is None
        assert (denied.closed_by.status, denied.closed_by.flag, denied.closed_by.failure) == (
            401, ResponseFlag.DENIED, FailureReason.DENIED)
        assert denied.closed_by.reason == "closed after a policy update: denied by default/deny-sleep"
        assert recheck(view(SLEEP, WEB2, DENY_SLEEP), admitted) == []  # closed once
        assert len(admitted) == 2  # until their relays end
    assert len(admitted) == 0 and admitted.pods() == []


def test_strict_closes_plaintext_and_keeps_mutual_tls() -> None:
    admitted = AdmittedConnections()
    plain = plaintext(POD, ("10.244.2.9", 33000), 8080)
    mtls = from_connect(connect("10.244.2.3:8080"))
    with admitted.holding(POD, plain, PlainEnd(), PlainEnd()) as p, \
            admitted.holding(POD, mtls, PlainEnd(), PlainEnd()) as m:
        assert recheck(view(SLEEP, WEB2, STRICT), admitted) == [p]
        assert m.closed_by is None


def test_connections_are_held_per_pod() -> None:
    admitted = AdmittedConnections()
    web1 = pod_of(WEB[0])
    with admitted.holding(POD, from_connect(connect("10.244.2.3:8080")), PlainEnd(), PlainEnd()), \
            admitted.holding(web1, from_connect(connect("10.244.1.3:8080")), PlainEnd(), PlainEnd()):
        assert sorted(admitted.pods()) == sorted([POD.uid, web1.uid])
        assert len(admitted.of(POD.uid)) == 1
        # Each decided as the pod it arrived at: a policy of web-2's namespace closes both (same namespace).
        assert len(recheck(view(SLEEP, *WEB, DENY_SLEEP), admitted)) == 2


def test_only_a_policys_denial_closes_a_connection() -> None:
    # A view without the pod (a state between two updates, or a pod on its way out) refuses new
    # connections with 503; the open ones are left to end with the pod, not cut by a re-check.
    admitted = AdmittedConnections()
    with admitted.holding(POD, from_connect(connect("10.244.2.3:8080")), PlainEnd(), PlainEnd()) as held:
        assert recheck(view(SLEEP), admitted) == [] and held.closed_by is None
        assert recheck(view(SLEEP, DENY_SLEEP), admitted) == []
