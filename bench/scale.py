"""The scale phase: many concurrent idle tunnels, and what they cost the node agents in memory and CPU.

The client side (`python -m bench.scale`, in the client pod) opens `--tunnels` connections at up to
`--rate` per second, with at most `WINDOW` being opened at once (a path that cannot open them that fast
sets the pace instead of failing them), sends one keep-alive request on each and reads its answer (so
every tunnel is proven end to end: client -> node agent -> HBONE -> node agent -> server), and keeps
them open and idle.  Then it prints one JSON line (`"event": "held"`), waits for a line on its standard
input (or `--hold-timeout` seconds), counts the connections the path closed while they were held, closes
them all and prints a last JSON line (`"event": "closed"`).

The harness side (`measure`) reads the mesh processes' resident memory (VmRSS) before (idle), while the
tunnels are held, and after they are closed, and their CPU seconds while the tunnels were opened:

- KiB per tunnel = (RSS held - RSS idle) / tunnels held, per process and summed over the pair of agents;
- CPU s per 1,000 connections = CPU seconds during the opening / tunnels opened * 1,000 (at 1,000/s this
  is also the fraction of a CPU the agents need to open 1,000 connections a second).

    python -m bench.scale --target 10.97.0.10:80 --target 10.97.0.10:81 --tunnels 10000 --rate 1000

Why several targets: the destination's node agent connects to the application from the client's address
(so the application sees it) and a source port from a range of 10,000 (`mesh.defaults.TRANSPARENT_PORTS`),
chosen at random with a few retries; one client address and application port can therefore hold at most
that many, and collisions start well before.  The bench spreads the tunnels over four server ports.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.histogram import Histogram
from bench.loadgen import RECV_SIZE, _cpu, build_request, parse_response, parse_target
from bench.netio import Proc, rss_kib, tree_cpu_seconds

OPEN_GRACE = 60.0  # seconds beyond the schedule before the opening gives up (a slow path opens later)
WINDOW = 64  # connections being opened at once, at most: a due one waits (the path sets the pace)
HOLD_TIMEOUT = 120.0  # the client closes its tunnels on its own after this long without word
SETTLE = 1.0  # seconds between the last tunnel opened (or closed) and reading the memory
QUIET_CPU = 0.05  # after closing, wait until the processes use less than this share of a CPU ...
QUIET_TIMEOUT = 30.0  # ... for up to this many seconds, so the next phase or mode starts on quiet proxies


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 64:
        raise OSError(errno.EMFILE, f"{need} tunnels need {need + 64} file descriptors, the limit is {soft}")


def open_tunnels(targets: list[tuple[str, int]], tunnels: int, rate: float, request: bytes,
                 window: int = WINDOW) -> tuple[list[socket.socket], dict[str, Any]]:
    """Open `tunnels` connections, to `targets` in turn, at up to `rate` per second and `window` at once,
    one request and answer each; the connections that answered, and what happened (opened, errors by
    reason, seconds, the latency from each connection's start, client CPU)."""
    ep = select.epoll()
    pending: dict[int, tuple[socket.socket, bytearray, int, bool]] = {}  # fd -> sock, buffer, due, sent
    held: list[socket.socket] = []
    errors: dict[str, int] = {}
    latency = Histogram()

    def error(reason: str) -> None:
        errors[reason] = errors.get(reason, 0) + 1

    def drop(fd: int) -> None:
        sock = pending.pop(fd)[0]
        ep.unregister(fd)
        sock.close()

    cpu0 = _cpu()
    t0 = time.monotonic_ns()
    end = t0 + int(tunnels / rate * 1e9) + int(OPEN_GRACE * 1e9)
    i = 0
    while (i < tunnels or pending) and time.monotonic_ns() < end:
        now = time.monotonic_ns()
        while i < tunnels and t0 + int(i * 1e9 / rate) <= now and len(pending) < window:
            target = targets[i % len(targets)]
            sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(target)
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                error(f"connect: {errno.errorcode.get(code, code)}")
            else:
                pending[sock.fileno()] = (sock, bytearray(), time.monotonic_ns(), False)
                ep.register(sock.fileno(), select.EPOLLOUT)
            i += 1
        due = t0 + int(i * 1e9 / rate) if i < tunnels and len(pending) < window else end
        for fd, _ in ep.poll(max(0.001, min((due - now) / 1e9, 0.05))):
            sock, buf, scheduled, sent = pending[fd]
            if not sent:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    error(f"connect: {errno.errorcode.get(err, err)}")
                    drop(fd)
                    continue
                try:
                    sock.send(request)
                except OSError as exc:
                    error(f"send: {exc.strerror or exc}")
                    drop(fd)
                    continue
                pending[fd] = (sock, buf, scheduled, True)
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                error(f"recv: {exc.strerror or exc}")
                drop(fd)
                continue
            if not data:
                error("closed before the answer")
                drop(fd)
                continue
            buf += data
            try:
                parsed = parse_response(buf)
            except ValueError as exc:
                error(f"bad response: {exc}")
                drop(fd)
                continue
            if parsed is None:
                continue
            if parsed[0] != 200:
                error(f"HTTP {parsed[0]}")
                drop(fd)
                continue
            latency.record((time.monotonic_ns() - scheduled) // 1000)
            pending.pop(fd)
            ep.unregister(fd)
            held.append(sock)
    for fd in list(pending):
        error("timed out")
        drop(fd)
    if i < tunnels:
        errors["never opened (the run ended first)"] = tunnels - i
    ep.close()
    return held, {"opened": len(held), "errors": errors, "error_count": sum(errors.values()),
                  "open_seconds": round((time.monotonic_ns() - t0) / 1e9, 2),
                 "opened_per_s": round(len(held) / max((time.monotonic_ns() - t0) / 1e9, 1e-9), 1),
                  "latency_us": latency.summary(), "client_cpu_seconds": round(_cpu() - cpu0, 3)}


def closed_while_held(held: list[socket.socket]) -> int:
    """How many of the held connections the path has closed (readable: EOF, a reset, or stray bytes)."""
    ep = select.epoll()
    for sock in held:
        ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    n = len(ep.poll(0, maxevents=max(1, len(held))))
    ep.close()
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, type=parse_target, action="append", metavar="HOST:PORT",
                   help="where to connect (repeat it to spread the tunnels over several)")
    p.add_argument("--tunnels", type=int, default=10000, help="connections to open and hold (default 10000)")
    p.add_argument("--rate", type=float, default=1000.0, help="connections opened per second (default 1000)")
    p.add_argument("--hold-timeout", type=float, default=HOLD_TIMEOUT,
                   help=f"seconds to hold without word on stdin (default {HOLD_TIMEOUT:g})")
    args = p.parse_args(argv)
    if args.tunnels < 1 or args.rate <= 0:
        p.error("--tunnels must be at least 1 and --rate positive")
    try:
        _raise_fd_limit(args.tunnels)
    except OSError as exc:
        print(json.dumps({"fatal": exc.strerror or str(exc)}), flush=True)
        return 1
    held, report = open_tunnels(args.target, args.tunnels, args.rate, build_request(args.target[0][0], "/"))
    print(json.dumps({"event": "held", **report}), flush=True)
    ready, _, _ = select.select([sys.stdin], [], [], args.hold_timeout)
    if ready:
        sys.stdin.readline()
    dropped = closed_while_held(held)
    for sock in held:
        sock.close()
    print(json.dumps({"event": "closed", "closed_while_held": dropped}), flush=True)
    return 0


# -- the harness side ------------------------------------------------------------------------------

def _json(line: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(line)
    return data


def wait_quiet(procs: list[Proc], timeout: float = QUIET_TIMEOUT) -> float:
    """Wait until `procs` together use under `QUIET_CPU` of a CPU (half-second samples); the seconds waited."""
    t0 = time.monotonic()
    last = sum(tree_cpu_seconds(p.pid) for p in procs)
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = sum(tree_cpu_seconds(p.pid) for p in procs)
        if now - last < QUIET_CPU * 0.5:
            break
        last = now
    return time.monotonic() - t0


def measure(start: Callable[[list[str]], subprocess.Popen[str]], procs: list[Proc], targets: list[str],
            tunnels: int, rate: float, timeout: float) -> dict[str, Any]:
    """Run the client side through `start` (which runs an argv in the client pod, pipes on stdin and
    stdout) and read the memory and CPU of `procs` around it."""
    idle = {p.role: rss_kib(p.pid) for p in procs}
    cpu0 = {p.role: tree_cpu_seconds(p.pid) for p in procs}
    proc = start([sys.executable, "-m", "bench.scale", *(a for t in targets for a in ("--target", t)),
                  "--tunnels", str(tunnels), "--rate", f"{rate:g}", "--hold-timeout", f"{timeout:g}"])
    assert proc.stdin is not None and proc.stdout is not None
    out: dict[str, Any] = {"tunnels": tunnels, "rate": rate, "rss_idle_kib": idle}
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith("{") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
        if not line.startswith("{"):
            return {**out, "error_count": 1, "errors": {"client": f"no answer ({proc.poll()})"}}
        held = _json(line)
        if "fatal" in held:
            return {**out, "error_count": 1, "errors": {"client": held["fatal"]}}
        out["mesh_cpu_seconds"] = {p.role: round(tree_cpu_seconds(p.pid) - cpu0[p.role], 3) for p in procs}
        time.sleep(SETTLE)
        out["rss_held_kib"] = {p.role: rss_kib(p.pid) for p in procs}
        proc.stdin.write("close\n")
        proc.stdin.flush()
        closed = _json(proc.stdout.readline() or "{}")
        proc.wait(timeout=30)
        time.sleep(SETTLE)
        out["quiet_after_s"] = round(wait_quiet(procs), 1)
        out["rss_after_kib"] = {p.role: rss_kib(p.pid) for p in procs}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    errors = dict(held.get("errors", {}))
    if closed.get("closed_while_held"):
        errors["closed while held"] = closed["closed_while_held"]
    opened = held["opened"]
    out.update({"opened": opened, "open_seconds": held["open_seconds"], "opened_per_s": held["opened_per_s"],
                "latency_us": held["latency_us"],
                "client_cpu_seconds": held["client_cpu_seconds"], "errors": errors,
                "error_count": sum(errors.values()), "completed": opened})
    if opened:
        out["kib_per_tunnel"] = {role: round((out["rss_held_kib"][role] - idle[role]) / opened, 2) for role in idle}
        out["cpu_per_1k_connections"] = round(sum(out["mesh_cpu_seconds"].values()) / opened * 1000, 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
