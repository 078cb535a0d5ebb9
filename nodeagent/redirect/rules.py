"""The in-pod redirect rules, as data: what to install in an enrolled pod's network namespace.

They follow the in-pod mode of Istio's ambient capture.  In the mangle table, packets of connections
the agent made (its sockets carry SO_MARK 0x539) get connmark 0x111, and the application's replies on
such connections get the mark restored, so that policy routing brings them to the agent.  In the nat
table, TCP arriving at the pod that is not for 15008 (HBONE) and not agent-made is redirected to 15006
(plaintext inbound), and TCP the pod's application sends anywhere but loopback is redirected to 15001
(outbound).  With DNS capture (the default, `--dns-capture`), UDP and TCP the application sends to port
53, loopback included (a pod's nameserver may be 127.0.0.1), are redirected to the agent's DNS proxy,
127.0.0.1:15053, first; the agent's own queries carry its mark and are left alone.

One departure from Istio's rules cuts the kernel's work per packet (issue 14) and changes nothing that
reaches an application or the agent: the mark is restored only on the packets that need it, the
application's (unmarked) packets in the reply direction of a connection marked 0x111, i.e. its replies
to the agent's transparent connections, whose destination is not in the pod.  Istio restores it on
every packet of a marked connection, the agent's own and the application's captured outbound ones
included, whose destinations are local either way; each changed mark costs the packet a second route
lookup (`bench.capture_bench` measures the rule sets side by side).

All rules live in chains the agent owns (`AMB_PRERT`, `AMB_OUTPUT`), entered by one jump from each
built-in chain; a set that differs in any rule (an earlier version's) is removed and installed again,
never adopted.  `install_script` and `remove_script` are iptables-restore input, so each change is
one atomic transaction and removal takes exactly what installation added.

Policy routing (`policy_routing`), installed and removed with the capture in both modes: the destination
agent connects to the application from the client's address (a transparent socket), so the
application's replies go to an address that is not in the pod; these ip rules send them to table 100,
`local 0.0.0.0/0 dev lo`, where they reach the agent's socket instead of leaving the pod.
- iptables mode, as Istio's in-pod mode: the mangle rules above give the agent's connections connmark
  0x111 and restore it on the application's replies; `fwmark 0x111/0xfff lookup 100`.
- eBPF mode has no iptables and so no connmark: the agent's sockets keep the main table
  (`fwmark 0x539/0xfff lookup main`), and TCP to the agent's transparent source ports
  (`TRANSPARENT_PORTS`) goes to table 100.  A client outside the mesh that picks such a port itself
  never completes a handshake with the application: the replies stay in the pod.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mesh import defaults

AGENT_MARK = defaults.AGENT_MARK
CONN_MARK = defaults.CONN_MARK
MARK_MASK = defaults.MARK_MASK
OUTBOUND_PORT = defaults.OUTBOUND_PORT
INBOUND_PLAIN_PORT = defaults.INBOUND_PLAIN_PORT
HBONE_PORT = defaults.HBONE_PORT
CHAIN_PRERT = "AMB_PRERT"
CHAIN_OUTPUT = "AMB_OUTPUT"
TABLE_CHAINS = {"mangle": (("PREROUTING", CHAIN_PRERT), ("OUTPUT", CHAIN_OUTPUT)),
                "nat": (("PREROUTING", CHAIN_PRERT), ("OUTPUT", CHAIN_OUTPUT))}
ROUTE_TABLE = defaults.INBOUND_ROUTE_TABLE
RULE_PRIORITY = defaults.INBOUND_RULE_PRIORITY
TRANSPARENT_PORTS = defaults.TRANSPARENT_PORTS
DNS_PORT = defaults.DNS_PORT
DNS_CAPTURE = defaults.DNS_CAPTURE


@dataclass(frozen=True)
class RuleSet:
    """The rules of one table: the chains' contents, in order."""

    table: str
    rules: tuple[str, ...]


def dns_rules(mark: str) -> tuple[str, ...]:
    """nat OUTPUT: the application's DNS (UDP and TCP to port 53) to the agent's DNS proxy."""
    return tuple(f"-A {CHAIN_OUTPUT} -p {proto} -m mark ! --mark {mark} -m {proto} --dport 53 "
                 f"-j REDIRECT --to-ports {DNS_PORT}" for proto in ("udp", "tcp"))


def rule_sets(dns: bool = DNS_CAPTURE) -> tuple[RuleSet, ...]:
    mark = f"{AGENT_MARK:#x}/{MARK_MASK:#x}"
    conn = f"{CONN_MARK:#x}/{MARK_MASK:#x}"
    mangle = RuleSet("mangle", (
        f"-A {CHAIN_PRERT} -m mark --mark {mark} -j CONNMARK --set-xmark {conn}",
        f"-A {CHAIN_OUTPUT} -m connmark --mark {conn} -m conntrack --ctdir REPLY -m mark ! --mark {mark} "
        "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    ))
    nat = RuleSet("nat", (*(dns_rules(mark) if dns else ()),
        f"-A {CHAIN_PRERT} ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport {HBONE_PORT} -m mark ! --mark {mark} "
        f"-j REDIRECT --to-ports {INBOUND_PLAIN_PORT}",
        f"-A {CHAIN_OUTPUT} -p tcp -m mark --mark {conn} -j ACCEPT",
        f"-A {CHAIN_OUTPUT} ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        f"-A {CHAIN_OUTPUT} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {mark} "
        f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
    ))
    return (mangle, nat)


def _jumps(table: str) -> list[tuple[str, str]]:
    return list(TABLE_CHAINS[table])


def install_script(dns: bool = DNS_CAPTURE, replacing: Mapping[str, list[tuple[str, str]]] | None = None) -> str:
    """iptables-restore --noflush input that creates the chains, fills them and jumps to them.  With
    `replacing` (the jumps of a set found in the pod: an earlier version's, half of one), the same
    transaction first deletes those jumps, and declaring a chain flushes what it held, so the pod goes
    from that set to this one in one commit per table, never uncaptured in between."""
    lines: list[str] = []
    for rs in rule_sets(dns):
        lines.append(f"*{rs.table}")
        lines += [f":{chain} - [0:0]" for _, chain in _jumps(rs.table)]
        lines += [f"-D {builtin} -j {chain}" for builtin, chain in (replacing or {}).get(rs.table, [])]
        lines += [f"-A {builtin} -j {chain}" for builtin, chain in _jumps(rs.table)]
        lines += list(rs.rules)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def remove_script(present_jumps: dict[str, list[tuple[str, str]]], present_chains: dict[str, set[str]]) -> str:
    """iptables-restore --noflush input that removes the jumps and chains that are present (and only
    those: a half-removed set must be removable too)."""
    lines: list[str] = []
    for table in TABLE_CHAINS:
        jumps = present_jumps.get(table, [])
        chains = [c for _, c in _jumps(table) if c in present_chains.get(table, set())]
        if not jumps and not chains:
            continue
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in chains]  # declaring a chain flushes it
        lines += [f"-D {builtin} -j {chain}" for builtin, chain in jumps]
        lines += [f"-X {chain}" for chain in chains]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True)
class Installed:
    """What `iptables-save` shows of our rules in one pod."""

    jumps: dict[str, list[tuple[str, str]]]
    chains: dict[str, set[str]]
    rules: dict[str, tuple[str, ...]]

    @property
    def empty(self) -> bool:
        return not any(self.jumps.values()) and not any(self.chains.values())

    def complete(self, dns: bool = DNS_CAPTURE) -> bool:
        """Exactly our rule set (with DNS capture or without), once: adoptable after an agent restart (an
        earlier version's set differs in some rule, so it is redone)."""
        for rs in rule_sets(dns):
            if sorted(self.jumps.get(rs.table, [])) != sorted(_jumps(rs.table)):
                return False
            if _by_chain(self.rules.get(rs.table, ())) != _by_chain(rs.rules):
                return False
        return True


def _by_chain(rules: tuple[str, ...]) -> dict[str, list[str]]:
    """Rules grouped by chain, in order within each (iptables-save lists chains alphabetically)."""
    out: dict[str, list[str]] = {}
    for rule in rules:
        out.setdefault(rule.split()[1], []).append(_normalise(rule))
    return out


def _normalise(rule: str) -> str:
    return " ".join(rule.replace("/0xffffffff", "").split())


def parse_saved(text: str) -> Installed:
    """Read our chains, their rules and the jumps to them out of `iptables-save` output."""
    ours = {CHAIN_PRERT, CHAIN_OUTPUT}
    jumps: dict[str, list[tuple[str, str]]] = {}
    chains: dict[str, set[str]] = {}
    rules: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in ours:
                chains.setdefault(table, set()).add(name)
        elif line.startswith("-A "):
            parts = line.split()
            chain = parts[1]
            if chain in ours:
                rules.setdefault(table, []).append(line)
            elif parts[-2:-1] == ["-j"] and parts[-1] in ours and len(parts) == 4:
                jumps.setdefault(table, []).append((chain, parts[-1]))
    return Installed(jumps, chains, {t: tuple(r) for t, r in rules.items()})


# -- policy routing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IpRule:
    """One `ip rule`: its priority, what it selects, the table it looks up."""

    priority: int
    selector: tuple[str, ...]  # ip rule's words, e.g. ("fwmark", "0x111/0xfff")
    table: str

    def words(self) -> list[str]:
        return ["pref", str(self.priority), *self.selector, "lookup", self.table]

    def shown(self) -> dict[str, object]:
        """How `ip -j rule show` prints this rule (the fields that identify it)."""
        out: dict[str, object] = {"priority": self.priority, "src": "all", "table": self.table}
        words = list(self.selector)
        for key, value in zip(words[::2], words[1::2], strict=True):
            if key == "fwmark":
                mark, _, mask = value.partition("/")
                out["fwmark"], out["fwmask"] = mark, mask
            elif key == "dport":
                low, _, high = value.partition("-")
                out["dport_start"], out["dport_end"] = int(low), int(high or low)
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class Routing:
    """The policy routing of one capture mode: its rules and the route of its table."""

    rules: tuple[IpRule, ...]
    route: tuple[str, ...] = ("local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE))


def policy_routing(mode: str) -> Routing:
    table = str(ROUTE_TABLE)
    if mode == "ebpf":
        low, high = TRANSPARENT_PORTS
        return Routing((IpRule(RULE_PRIORITY - 1, ("fwmark", f"{AGENT_MARK:#x}/{MARK_MASK:#x}"), "main"),
                        IpRule(RULE_PRIORITY, ("ipproto", "tcp", "dport", f"{low}-{high}"), table)))
    return Routing((IpRule(RULE_PRIORITY, ("fwmark", f"{CONN_MARK:#x}/{MARK_MASK:#x}"), table),))


ALL_RULES = tuple(r for mode in defaults.REDIRECT_MODES for r in policy_routing(mode).rules)


@dataclass(frozen=True)
class RoutingFound:
    """Which of our rules (of any mode, as `ip -j rule show` printed them) and whether our route are in a pod."""

    rules: tuple[IpRule, ...]
    route: bool

    @property
    def empty(self) -> bool:
        return not self.rules and not self.route

    def exactly(self, routing: Routing) -> bool:
        return sorted(self.rules, key=str) == sorted(routing.rules, key=str) and self.route

    def detail(self) -> tuple[str, ...]:
        return tuple(["ip rule " + " ".join(r.words()) for r in self.rules]
                     + (["ip route " + " ".join(Routing(()).route)] if self.route else []))


def parse_routing(rules_json: str, routes_json: str) -> RoutingFound:
    """Ours among `ip -4 -j rule show` and `ip -4 -j route show table 100` (json)."""
    shown = json.loads(rules_json or "[]")
    rules = tuple(r for r in ALL_RULES if r.shown() in [_identity(s) for s in shown])
    routes = json.loads(routes_json or "[]")
    route = any(r.get("type") == "local" and r.get("dst") == "default" and r.get("dev") == "lo" for r in routes)
    return RoutingFound(rules, route)


def _identity(shown: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in shown.items() if k not in ("flags", "protocol")}


def routing_install_script(routing: Routing) -> str:
    """`ip -batch` input: the route first, so that the rules never point at an empty table."""
    return "\n".join([" ".join(("route", "replace", *routing.route)),
                      *(" ".join(("rule", "add", *r.words())) for r in routing.rules)]) + "\n"


def routing_remove_script(found: RoutingFound) -> str:
    """`ip -batch` input removing exactly what `found` saw of ours: the rules first, then the route."""
    lines = [" ".join(("rule", "del", *r.words())) for r in found.rules]
    if found.route:
        lines.append(" ".join(("route", "del", *Routing(()).route)))
    return "\n".join(lines) + "\n" if lines else ""
