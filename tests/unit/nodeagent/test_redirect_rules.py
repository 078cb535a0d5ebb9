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
    assert found.jumps == {"mangle": [("OUTPUT", CHAIN_OUTPUT), ("PREROUTING", CHAIN_PRERT)],
                           "nat": [("OUTPUT", CHAIN_OUTPUT), ("PREROUTING", CHAIN_PRERT)]}


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
