"""DNS capture in the in-pod iptables rules: UDP and TCP to port 53 go to the DNS proxy (15053), first,
loopback included, the agent's own (marked) queries left alone; without DNS capture there is no such rule,
and a pod captured one way is not taken for exactly ours the other way (the next agent redoes it)."""

from __future__ import annotations

from test_redirect_rules import saved_after

from nodeagent.redirect.rules import CHAIN_OUTPUT, install_script, parse_saved, rule_sets


def test_dns_rules_come_first_in_nat_output() -> None:
    nat = next(rs for rs in rule_sets(dns=True) if rs.table == "nat")
    output = [r for r in nat.rules if r.startswith(f"-A {CHAIN_OUTPUT} ")]
    assert output[:2] == [
        f"-A {CHAIN_OUTPUT} -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        f"-A {CHAIN_OUTPUT} -p tcp -m mark ! --mark 0x539/0xfff -m tcp --dport 53 -j REDIRECT --to-ports 15053",
    ]
    assert not any("--dport 53 " in r for rs in rule_sets(dns=False) for r in rs.rules)


def test_capture_with_and_without_dns_are_told_apart() -> None:
    with_dns = parse_saved(saved_after(install_script(dns=True)))
    without = parse_saved(saved_after(install_script(dns=False)))
    assert with_dns.complete(dns=True) and not with_dns.complete(dns=False)
    assert without.complete(dns=False) and not without.complete(dns=True)
