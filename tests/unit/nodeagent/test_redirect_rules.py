"""The in-pod iptables rules as data: what install writes, `iptables-save` reads back as complete, and
what remove takes away (exactly, also from a half-installed set)."""

from __future__ import annotations

from nodeagent.redirect.rules import (
    CHAIN_OUTPUT,
    CHAIN_PRERT,
    install_script,
    parse_saved,
    remove_script,
    rule_sets,
)


def saved_after(script: str, base: str = "") -> str:
    """What `iptables-save` prints after `iptables-restore --noflush` of `script` on a pod with `base`
    (a small model: chains are declared, rules appended, jumps added; good enough to round-trip ours)."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in (base + script).splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables.setdefault(current, {"PREROUTING": [], "OUTPUT": []})
        elif line.startswith(":"):
            tables[current][line[1:].split()[0]] = []
        elif line.startswith("-A "):
            tables[current].setdefault(line.split()[1], []).append(line)
        elif line.startswith("-D "):
            tables[current][line.split()[1]].remove("-A" + line[2:])
        elif line.startswith("-X "):
            del tables[current][line.split()[1]]
    out = []
    for table, chains in tables.items():
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in sorted(chains)]
        out += [rule for c in sorted(chains) for rule in chains[c]]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def test_installed_rules_read_back_as_exactly_ours() -> None:
    found = parse_saved(saved_after(install_script()))
    assert not found.empty and found.complete()
    assert found.jumps == {table: [("OUTPUT", CHAIN_OUTPUT), ("PREROUTING", CHAIN_PRERT)]
                           for table in ("mangle", "nat")}


def test_the_rules_follow_istios_in_pod_mode() -> None:
    mangle, nat = rule_sets()
    assert any("--to-ports 15006" in r and "! --dport 15008" in r for r in nat.rules)
    assert any("--to-ports 15001" in r and "! -d 127.0.0.1/32" in r for r in nat.rules)
    assert any("CONNMARK --set-xmark 0x111/0xfff" in r for r in mangle.rules)


def test_remove_takes_exactly_what_install_added() -> None:
    found = parse_saved(saved_after(install_script()))
    after = parse_saved(saved_after(remove_script(found.jumps, found.chains), saved_after(install_script())))
    assert after.empty


def test_nothing_to_remove_is_an_empty_script() -> None:
    assert remove_script({}, {}) == ""
    assert parse_saved("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").empty


def test_a_half_installed_set_is_not_complete_and_is_removable() -> None:
    half = "*nat\n:AMB_PRERT - [0:0]\n-A PREROUTING -j AMB_PRERT\nCOMMIT\n"
    found = parse_saved(half)
    assert not found.empty and not found.complete()
    script = remove_script(found.jumps, found.chains)
    assert "-D PREROUTING -j AMB_PRERT" in script and "-X AMB_PRERT" in script and "*mangle" not in script


def test_a_rule_changed_by_hand_is_not_adopted() -> None:
    text = saved_after(install_script()).replace("--to-ports 15001", "--to-ports 15002")
    assert not parse_saved(text).complete()


def test_a_foreign_jump_to_another_chain_is_not_ours() -> None:
    text = saved_after(install_script()) + "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j KUBE-FW\nCOMMIT\n"
    found = parse_saved(text)
    assert "filter" not in found.jumps and found.complete()


# The rule set of the version before issue 14's change (the connmark restored on every packet of a marked
# connection, as Istio does), as `iptables-restore` input.  A pod that still has it after an agent
# upgrade must be redone, not adopted.
PREVIOUS_VERSION = """*mangle
:AMB_PRERT - [0:0]
:AMB_OUTPUT - [0:0]
-A PREROUTING -j AMB_PRERT
-A OUTPUT -j AMB_OUTPUT
-A AMB_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A AMB_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:AMB_PRERT - [0:0]
:AMB_OUTPUT - [0:0]
-A PREROUTING -j AMB_PRERT
-A OUTPUT -j AMB_OUTPUT
-A AMB_OUTPUT -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A AMB_OUTPUT -p tcp -m mark ! --mark 0x539/0xfff -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A AMB_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A AMB_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A AMB_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A AMB_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
"""


def test_the_previous_versions_rules_are_not_adopted_and_are_removed_whole() -> None:
    found = parse_saved(saved_after(PREVIOUS_VERSION))
    assert not found.empty and not found.complete() and not found.complete(dns=False)
    after = parse_saved(saved_after(remove_script(found.jumps, found.chains), saved_after(PREVIOUS_VERSION)))
    assert after.empty
    # ... and the new set installs over what the removal left
    assert parse_saved(saved_after(install_script(), saved_after(remove_script(found.jumps, found.chains),
                                                                 saved_after(PREVIOUS_VERSION)))).complete()


def test_an_earlier_set_is_replaced_in_one_commit_per_table() -> None:
    # An agent restart that finds another set (an earlier version's, or ours twice) does not remove it
    # first and install after: the pod would be uncaptured in between.
    for base in (saved_after(PREVIOUS_VERSION), saved_after(install_script() + install_script(dns=False))):
        found = parse_saved(base)
        script = install_script(replacing=found.jumps)
        assert [line for line in script.splitlines() if line.startswith("*")] == ["*mangle", "*nat"]
        assert script.count("COMMIT") == 2 and "-X " not in script
        after = parse_saved(saved_after(script, base))
        assert after.complete() and after.rules == parse_saved(saved_after(install_script())).rules
    # a half-removed set (chains without their jumps) is taken over the same way
    half = "*mangle\n:AMB_PRERT - [0:0]\nCOMMIT\n"
    assert parse_saved(saved_after(install_script(replacing=parse_saved(saved_after(half)).jumps), saved_after(half))).complete()


def test_only_the_applications_replies_get_the_connmark_restored() -> None:
    # The restored mark routes the application's replies of the agent's transparent connections to the
    # local table; nothing else needs it (the agent's own packets carry its mark, the application's own
    # connections go to a local address), and a changed mark costs a route lookup on every packet.
    mangle, _nat = rule_sets()
    restore = [r for r in mangle.rules if "--restore-mark" in r]
    assert len(restore) == 1
    assert "-m connmark --mark 0x111/0xfff" in restore[0] and "--ctdir REPLY" in restore[0]
    assert "-m mark ! --mark 0x539/0xfff" in restore[0]
