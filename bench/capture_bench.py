"""The iptables capture's kernel cost per request, one rule set against another (issue 14).

    python -m bench.capture_bench [--variants istio,restore,ours] [--requests 4000] [--rounds 6]

Needs root (network namespaces).  Two namespaces joined by a veth: a pod, holding a capture rule set and
its policy routing (`nodeagent.redirect.rules`), and a peer with no rules.  One process drives, with
blocking sockets, the four hops a request takes inside the enrolled pods of mode b (the client's pod
and the destination's pod, both played by the one pod):

- the application's connection to a service address, captured to 15001 (nat REDIRECT, over loopback);
- the agent's HBONE connection out to a peer's 15008 (marked, over the veth);
- HBONE in to the pod's 15008 (over the veth);
- the agent's transparent connection to the application from the client's address (marked, over
  loopback), whose replies the restored connmark routes back to the agent.

A request is 1 KiB each way on each hop.  Each batch installs one variant, opens the four connections,
carries `--requests` requests and measures the process's CPU (utime + stime: the netfilter work of a
packet sent on loopback or a veth runs in the sender's system call, as it does for the node agent); the
variants take turns, batch by batch, so that drift on a shared machine hits them alike.  Variants:

- `istio`: Istio's in-pod rules as this project installed them before issue 14 (the connmark restored
  on every packet of a marked connection);
- `ours`: what `rules.rule_sets()` installs now (the connmark restored only on the application's
  replies);
- `notrack`: `ours`, and HBONE to the pod's 15008 not tracked by conntrack (a raw table); measured, not
  kept: the raw table's two hooks cost every packet more than skipping conntrack saves on a third of them;
- `outmark`: `ours` with the connmark set in mangle OUTPUT (`-o lo`, the agent's mark) instead of
  PREROUTING, so that mangle has no PREROUTING hook; measured, not kept (no difference).

Prints CPU microseconds per request per variant (median over rounds) and the ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from mesh import defaults, netns
from nodeagent.proxy.sockets import make_transparent
from nodeagent.redirect import rules

POD_IP, PEER_IP = "10.251.0.2", "10.251.0.1"
SERVICE = ("10.96.251.1", 80)  # captured to 15001 (nothing listens there)
APP_PORT = 8080
PAYLOAD = b"x" * 1024

PRERT, OUT = rules.CHAIN_PRERT, rules.CHAIN_OUTPUT
MARK, CONN = "0x539/0xfff", "0x111/0xfff"
SET_IN_OUTPUT = f"-A {OUT} -o lo -m mark --mark {MARK} -j CONNMARK --set-xmark {CONN}"
RESTORE_ALL = f"-A {OUT} -m connmark --mark {CONN} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
NOTRACK_HBONE = (f"-A {PRERT} ! -i lo -p tcp -m tcp --dport {defaults.HBONE_PORT} -j CT --notrack",
                 f"-A {OUT} ! -o lo -p tcp -m tcp --sport {defaults.HBONE_PORT} -m mark --mark {MARK} -j CT --notrack")
VARIANTS = ("istio", "ours", "notrack", "outmark")


def variant_tables(name: str) -> dict[str, tuple[str, ...]]:
    """Each table's rules in one variant; only the lever differs from today's (`rules.rule_sets()`)."""
    ours = {rs.table: rs.rules for rs in rules.rule_sets()}
    set_mark, restore = ours["mangle"]
    if name == "ours":
        return ours
    if name == "istio":
        return {**ours, "mangle": (set_mark, RESTORE_ALL)}
    if name == "notrack":
        return {"raw": NOTRACK_HBONE, **ours}
    if name == "outmark":
        return {**ours, "mangle": (SET_IN_OUTPUT, restore)}
    raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}")


def variant_script(name: str) -> str:
    """iptables-restore input for one variant: each table's chains, the jumps to those used, the rules."""
    lines: list[str] = []
    for table, table_rules in variant_tables(name).items():
        used = [c for c in (PRERT, OUT) if any(r.split()[1] == c for r in table_rules)]
        builtin = {PRERT: "PREROUTING", OUT: "OUTPUT"}
        lines += [f"*{table}", *(f":{c} - [0:0]" for c in used), *(f"-A {builtin[c]} -j {c}" for c in used),
                  *table_rules, "COMMIT"]
    return "\n".join(lines) + "\n"


def run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


@contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    pod, peer = f"capbench-{os.getpid()}-pod", f"capbench-{os.getpid()}-peer"
    try:
        for ns in (pod, peer):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", "cb-peer", "netns", peer, "type", "veth", "peer", "name", "eth0", "netns", pod)
        run("ip", "-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        run("ip", "-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", "cb-peer")
        run("ip", "-n", pod, "link", "set", "eth0", "up")
        run("ip", "-n", peer, "link", "set", "cb-peer", "up")
        run("ip", "-n", pod, "route", "add", "default", "via", PEER_IP)
        run("ip", "-n", pod, "-batch", "-", stdin=rules.routing_install_script(rules.policy_routing("iptables")))
        yield pod, peer
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def listener(ns: str, host: str, port: int, mark: bool) -> socket.socket:
    with netns.entered(f"/run/netns/{ns}"):
        sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, defaults.AGENT_MARK)
    sock.bind((host, port))
    sock.listen(8)
    return sock


def connected(ns: str, target: tuple[str, int], server: socket.socket, *, mark: bool = False,
              source: str | None = None) -> tuple[socket.socket, socket.socket]:
    with netns.entered(f"/run/netns/{ns}"):
        sock = socket.socket()
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, defaults.AGENT_MARK)
    if source is not None:
        make_transparent(sock, source, 0)  # as the agent binds it
    sock.connect(target)
    accepted, _ = server.accept()
    for s in (sock, accepted):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, accepted


def exchange(pairs: list[tuple[socket.socket, socket.socket]], requests: int) -> None:
    size = len(PAYLOAD)
    for _ in range(requests):
        for client, server in pairs:
            client.sendall(PAYLOAD)
            got = 0
            while got < size:
                got += len(server.recv(size - got))
            server.sendall(PAYLOAD)
            got = 0
            while got < size:
                got += len(client.recv(size - got))


def cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def batch(pod: str, peer: str, variant: str, requests: int) -> float:
    """CPU microseconds per request with `variant` installed."""
    run("ip", "netns", "exec", pod, "nft", "flush", "ruleset")  # no table (and no hook) of the last variant
    run("ip", "netns", "exec", pod, "iptables-restore", "-w", "5", stdin=variant_script(variant))
    servers = [listener(pod, "0.0.0.0", defaults.OUTBOUND_PORT, True),
               listener(peer, PEER_IP, defaults.HBONE_PORT, True),
               listener(pod, POD_IP, defaults.HBONE_PORT, True),
               listener(pod, "0.0.0.0", APP_PORT, False)]
    pairs = [connected(pod, SERVICE, servers[0]),
             connected(pod, (PEER_IP, defaults.HBONE_PORT), servers[1], mark=True),
             connected(peer, (POD_IP, defaults.HBONE_PORT), servers[2]),
             connected(pod, (POD_IP, APP_PORT), servers[3], mark=True, source=PEER_IP)]
    try:
        exchange(pairs, 200)  # warm
        start = cpu()
        exchange(pairs, requests)
        return (cpu() - start) / requests * 1e6
    finally:
        for pair in pairs:
            for s in pair:
                s.close()
        for s in servers:
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capture_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        variant_script(v)  # unknown names fail before anything is made
    if not variants or args.requests < 1 or args.rounds < 1:
        parser.error("--variants must name at least one variant, --requests and --rounds must be at least 1")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    results: dict[str, list[float]] = {v: [] for v in variants}
    with namespaces() as (pod, peer):
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                results[v].append(batch(pod, peer, v, args.requests))
    base = statistics.median(results[variants[0]])
    print(f"{'variant':10} {'us/request (median)':>20} {'vs ' + variants[0]:>10}   rounds")
    for v in variants:
        med = statistics.median(results[v])
        print(f"{v:10} {med:20.2f} {med / base:9.3f}x   " + " ".join(f"{x:.1f}" for x in results[v]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
