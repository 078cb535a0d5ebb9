"""L4 authorization: matching of each field, the decision order, dry-run and AUDIT, STRICT mTLS."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.identity import SpiffeId
from mesh.policy.evaluator import ConnectionInfo, PolicyMatch, evaluate, match_holds, policy_matches
from mesh.proto import discovery_pb2 as pb

SLEEP = SpiffeId("cluster.local", "default", "sleep")
OTHER_TD = SpiffeId("other.domain", "prod", "web")
DEST = pb.Workload(uid="prod/web-1", name="web-1", namespace="prod", addresses=["10.244.2.5"])

CONN = ConnectionInfo(
    source_principal=SLEEP,
    source_ip="10.244.1.3",
    destination=DEST,
    destination_ip="10.244.2.5",
    destination_port=8080,
)
PLAIN = replace(CONN, source_principal=None)


def exact(v: str) -> pb.StringMatch:
    return pb.StringMatch(exact=v)


def prefix(v: str) -> pb.StringMatch:
    return pb.StringMatch(prefix=v)


def suffix(v: str) -> pb.StringMatch:
    return pb.StringMatch(suffix=v)


PRESENT = pb.StringMatch(presence=True)


def policy(name: str, action: pb.AuthorizationAction = pb.ALLOW, *matches: pb.Match, rules: list[pb.Rule] | None = None,
           dry_run: bool = False, namespace: str = "prod") -> pb.Authorization:
    if rules is None:
        rules = [pb.Rule(clauses=[pb.Clause(matches=list(matches))])] if matches else []
    return pb.Authorization(name=name, namespace=namespace, scope=pb.NAMESPACE, action=action, rules=rules,
                            dry_run=dry_run)


# --- one Match against one connection -------------------------------------------------------------------

MATCH_CASES = [
    # (id, match, connection, expected)
    ("empty match holds", pb.Match(), CONN, True),
    ("principal exact, Istio form", pb.Match(principals=[exact("cluster.local/ns/default/sa/sleep")]), CONN, True),
    ("principal exact, SPIFFE form", pb.Match(principals=[exact("spiffe://cluster.local/ns/default/sa/sleep")]),
     CONN, True),
    ("principal exact, other sa", pb.Match(principals=[exact("cluster.local/ns/default/sa/other")]), CONN, False),
    ("principal prefix", pb.Match(principals=[prefix("cluster.local/ns/default/")]), CONN, True),
    ("principal prefix with scheme", pb.Match(principals=[prefix("spiffe://cluster.local/ns/default/")]),
     CONN, True),
    ("principal prefix other ns", pb.Match(principals=[prefix("cluster.local/ns/prod/")]), CONN, False),
    ("principal suffix", pb.Match(principals=[suffix("/sa/sleep")]), CONN, True),
    ("principal presence", pb.Match(principals=[PRESENT]), CONN, True),
    ("principal presence, plaintext", pb.Match(principals=[PRESENT]), PLAIN, False),
    ("principal exact, plaintext", pb.Match(principals=[exact("cluster.local/ns/default/sa/sleep")]), PLAIN, False),
    ("principals are OR", pb.Match(principals=[exact("x/ns/a/sa/b"), suffix("sa/sleep")]), CONN, True),
    ("not_principals hit", pb.Match(not_principals=[suffix("/sa/sleep")]), CONN, False),
    ("not_principals miss", pb.Match(not_principals=[suffix("/sa/web")]), CONN, True),
    ("not_principals presence, identity", pb.Match(not_principals=[PRESENT]), CONN, False),
    ("not_principals presence, plaintext", pb.Match(not_principals=[PRESENT]), PLAIN, True),
    ("not_principals exact, plaintext", pb.Match(not_principals=[exact("cluster.local/ns/a/sa/b")]), PLAIN, True),
    ("trust domain is part of the principal",
     pb.Match(principals=[exact("cluster.local/ns/prod/sa/web")]), replace(CONN, source_principal=OTHER_TD), False),
    ("empty StringMatch matches nothing", pb.Match(principals=[pb.StringMatch()]), CONN, False),
    ("namespace exact", pb.Match(namespaces=[exact("default")]), CONN, True),
    ("namespace other", pb.Match(namespaces=[exact("prod")]), CONN, False),
    ("namespace prefix", pb.Match(namespaces=[prefix("def")]), CONN, True),
    ("namespace presence, plaintext", pb.Match(namespaces=[PRESENT]), PLAIN, False),
    ("not_namespaces hit", pb.Match(not_namespaces=[exact("default")]), CONN, False),
    ("not_namespaces miss", pb.Match(not_namespaces=[exact("prod")]), CONN, True),
    ("not_namespaces, plaintext", pb.Match(not_namespaces=[exact("default")]), PLAIN, True),
    ("source cidr in", pb.Match(source_ips=["10.244.1.0/24"]), CONN, True),
    ("source cidr out", pb.Match(source_ips=["10.244.2.0/24"]), CONN, False),
    ("source bare address", pb.Match(source_ips=["10.244.1.3"]), CONN, True),
    ("source /32 other", pb.Match(source_ips=["10.244.1.4/32"]), CONN, False),
    ("source cidr non-canonical", pb.Match(source_ips=["10.244.1.77/16"]), CONN, True),
    ("source ipv6 cidr vs ipv4", pb.Match(source_ips=["::/0"]), CONN, False),
    ("source v4-mapped v6 address", pb.Match(source_ips=["10.244.1.0/24"]),
     replace(CONN, source_ip="::ffff:10.244.1.3"), True),
    ("source ipv6", pb.Match(source_ips=["fd00::/8"]), replace(CONN, source_ip="fd00::5"), True),
    ("bad cidr matches nothing", pb.Match(source_ips=["not-a-cidr", "10.0.0.0/8"]), CONN, True),
    ("only bad cidr", pb.Match(source_ips=["not-a-cidr"]), CONN, False),
    ("not_source cidr hit", pb.Match(not_source_ips=["10.0.0.0/8"]), CONN, False),
    ("not_source cidr miss", pb.Match(not_source_ips=["192.168.0.0/16"]), CONN, True),
    ("destination ip in", pb.Match(destination_ips=["10.244.2.5/32"]), CONN, True),
    ("destination ip out", pb.Match(destination_ips=["10.244.2.6/32"]), CONN, False),
    ("not_destination ip hit", pb.Match(not_destination_ips=["10.244.2.0/24"]), CONN, False),
    ("port in", pb.Match(destination_ports=[80, 8080]), CONN, True),
    ("port out", pb.Match(destination_ports=[80]), CONN, False),
    ("not port hit", pb.Match(not_destination_ports=[8080]), CONN, False),
    ("not port miss", pb.Match(not_destination_ports=[9090]), CONN, True),
    ("fields are AND: all hold", pb.Match(namespaces=[exact("default")], destination_ports=[8080],
                                          source_ips=["10.0.0.0/8"]), CONN, True),
    ("fields are AND: one fails", pb.Match(namespaces=[exact("default")], destination_ports=[9090]), CONN, False),
]


@pytest.mark.parametrize(("match", "conn", "expected"), [c[1:] for c in MATCH_CASES], ids=[c[0] for c in MATCH_CASES])
def test_match(match: pb.Match, conn: ConnectionInfo, expected: bool) -> None:
    assert match_holds(match, conn) is expected


# --- structure: rules, clauses -------------------------------------------------------------------------

NS_DEFAULT = pb.Match(namespaces=[exact("default")])
NS_PROD = pb.Match(namespaces=[exact("prod")])
PORT_8080 = pb.Match(destination_ports=[8080])
PORT_80 = pb.Match(destination_ports=[80])

STRUCTURE_CASES = [
    ("no rules matches nothing", [], False),
    ("empty rule matches everything", [pb.Rule()], True),
    ("rule with empty clause matches everything", [pb.Rule(clauses=[pb.Clause()])], True),
    ("clause: any match (OR)", [pb.Rule(clauses=[pb.Clause(matches=[NS_PROD, NS_DEFAULT])])], True),
    ("clause: no match holds", [pb.Rule(clauses=[pb.Clause(matches=[NS_PROD, PORT_80])])], False),
    ("rule: all clauses (AND)", [pb.Rule(clauses=[pb.Clause(matches=[NS_DEFAULT]), pb.Clause(matches=[PORT_8080])])],
     True),
    ("rule: one clause fails", [pb.Rule(clauses=[pb.Clause(matches=[NS_DEFAULT]), pb.Clause(matches=[PORT_80])])],
     False),
    ("policy: any rule (OR)", [pb.Rule(clauses=[pb.Clause(matches=[NS_PROD])]),
                               pb.Rule(clauses=[pb.Clause(matches=[PORT_8080])])], True),
]


@pytest.mark.parametrize(("rules", "expected"), [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES])
def test_policy_structure(rules: list[pb.Rule], expected: bool) -> None:
    assert policy_matches(policy("p", pb.ALLOW, rules=rules), CONN) is expected


# --- decisions ------------------------------------------------------------------------------------------

FROM_DEFAULT = pb.Match(namespaces=[exact("default")])
FROM_PROD = pb.Match(namespaces=[exact("prod")])
STRICT = pb.Match(not_principals=[PRESENT])
ANY = pb.Rule()

DECISION_CASES = [
    # (id, policies, connection, allowed, deciding policy, reason starts with)
    ("no policies: allow", [], CONN, True, None, "no policy applies"),
    ("allow matches", [policy("a", pb.ALLOW, FROM_DEFAULT)], CONN, True, "prod/a", "allowed by prod/a"),
    ("allow exists, none matches", [policy("a", pb.ALLOW, FROM_PROD)], CONN, False, None,
     "denied: no ALLOW policy matched (prod/a)"),
    ("allow-nothing (no rules) denies all", [policy("allow-nothing", pb.ALLOW)], CONN, False, None, "denied: no ALLOW"),
    ("allow-all (rules: [{}])", [policy("allow-all", pb.ALLOW, rules=[ANY])], CONN, True, "prod/allow-all", "allowed"),
    ("one of two allows matches", [policy("a", pb.ALLOW, FROM_PROD), policy("b", pb.ALLOW, FROM_DEFAULT)], CONN,
     True, "prod/b", "allowed by prod/b"),
    ("deny matches", [policy("d", pb.DENY, FROM_DEFAULT)], CONN, False, "prod/d", "denied by prod/d"),
    ("deny does not match", [policy("d", pb.DENY, FROM_PROD)], CONN, True, None, "no policy applies"),
    ("deny without rules denies nothing", [policy("d", pb.DENY)], CONN, True, None, "no policy applies"),
    ("deny-all (rules: [{}])", [policy("d", pb.DENY, rules=[ANY])], CONN, False, "prod/d", "denied by prod/d"),
    ("deny wins over a matching allow", [policy("a", pb.ALLOW, rules=[ANY]), policy("d", pb.DENY, FROM_DEFAULT)],
     CONN, False, "prod/d", "denied by prod/d"),
    ("non-matching deny, matching allow", [policy("a", pb.ALLOW, FROM_DEFAULT), policy("d", pb.DENY, FROM_PROD)],
     CONN, True, "prod/a", "allowed by prod/a"),
    ("audit alone never denies", [policy("au", pb.AUDIT, rules=[ANY])], CONN, True, None, "no policy applies"),
    ("audit does not count as an allow", [policy("au", pb.AUDIT, FROM_PROD)], CONN, True, None, "no policy applies"),
    ("dry-run deny is not enforced", [policy("d", pb.DENY, rules=[ANY], dry_run=True)], CONN, True, None,
     "no policy applies"),
    ("dry-run allow does not make allow-mode", [policy("a", pb.ALLOW, FROM_PROD, dry_run=True)], CONN, True, None,
     "no policy applies"),
    ("STRICT: plaintext denied", [policy("converted_peer_authentication_default", pb.DENY, STRICT)], PLAIN, False,
     "prod/converted_peer_authentication_default", "denied by prod/converted_peer_authentication_default"),
    ("STRICT: mTLS passes", [policy("converted_peer_authentication_default", pb.DENY, STRICT)], CONN, True, None,
     "no policy applies"),
    ("STRICT with a permissive port: exempt port passes",
     [policy("pa", pb.DENY, pb.Match(not_principals=[PRESENT], not_destination_ports=[8080]))], PLAIN, True, None,
     "no policy applies"),
    ("STRICT on a port only: other port passes",
     [policy("pa", pb.DENY, pb.Match(not_principals=[PRESENT], destination_ports=[9090]))], PLAIN, True, None,
     "no policy applies"),
    ("STRICT and an allow: mTLS allowed", [policy("pa", pb.DENY, STRICT), policy("a", pb.ALLOW, FROM_DEFAULT)], CONN,
     True, "prod/a", "allowed"),
    ("plaintext vs principal allow", [policy("a", pb.ALLOW, pb.Match(principals=[PRESENT]))], PLAIN, False, None,
     "denied: no ALLOW"),
    ("plaintext vs ip allow", [policy("a", pb.ALLOW, pb.Match(source_ips=["10.244.1.0/24"]))], PLAIN, True, "prod/a",
     "allowed"),
    ("two denies: first by name decides", [policy("z", pb.DENY, rules=[ANY]), policy("b", pb.DENY, rules=[ANY])],
     CONN, False, "prod/b", "denied by prod/b"),
]


@pytest.mark.parametrize(
    ("policies", "conn", "allowed", "deciding", "reason"),
    [c[1:] for c in DECISION_CASES],
    ids=[c[0] for c in DECISION_CASES],
)
def test_decision(policies: list[pb.Authorization], conn: ConnectionInfo, allowed: bool, deciding: str | None,
                  reason: str) -> None:
    d = evaluate(conn, policies)
    assert d.allowed is allowed
    assert d.denied is not allowed
    assert d.policy == deciding
    assert d.reason.startswith(reason)
    assert d.result() == ("" if allowed else f"401 {d.reason}")


def test_audit_matches_are_reported() -> None:
    d = evaluate(CONN, [policy("au", pb.AUDIT, FROM_DEFAULT), policy("au2", pb.AUDIT, FROM_PROD),
                        policy("a", pb.ALLOW, rules=[ANY])])
    assert d.allowed
    assert d.audited == (PolicyMatch("prod/au", "AUDIT"),)


def test_dry_run_reports_what_would_happen() -> None:
    d = evaluate(CONN, [policy("d", pb.DENY, FROM_DEFAULT, dry_run=True), policy("a", pb.ALLOW, rules=[ANY])])
    assert d.allowed and d.policy == "prod/a"
    assert d.would_allow is False
    assert d.dry_run == (PolicyMatch("prod/d", "DENY", True),)


def test_dry_run_allow_that_would_deny_others() -> None:
    d = evaluate(CONN, [policy("a", pb.ALLOW, FROM_PROD, dry_run=True)])
    assert d.allowed
    assert d.would_allow is False  # enforced, the ALLOW policy would leave this connection unmatched
    assert d.dry_run == ()


def test_would_allow_equals_allowed_without_dry_run() -> None:
    assert evaluate(CONN, [policy("d", pb.DENY, rules=[ANY])]).would_allow is False
    assert evaluate(CONN, []).would_allow is True


def test_policies_from_other_namespaces_are_named_with_theirs() -> None:
    d = evaluate(CONN, [policy("global-deny", pb.DENY, rules=[ANY], namespace="istio-system")])
    assert d.policy == "istio-system/global-deny"
    assert d.result() == "401 denied by istio-system/global-deny"


def test_decision_is_frozen() -> None:
    d = evaluate(CONN, [])
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]
