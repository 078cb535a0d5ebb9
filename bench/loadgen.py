"""A constant-rate, open-loop HTTP/1.1 load generator, and its closed-loop single-connection sibling.

Open loop (`--rate R --connections C`): request *i* is due at `start + i / R` on connection `i mod C`
(so each connection carries one request every `C / R` seconds, staggered).  No pipelining: a request
whose connection is still waiting for the previous response queues on it, and its latency is measured
from its *scheduled* time, not from when it could finally be written.  A stall of the path therefore
shows up in every request it delays (the coordinated-omission correction).  Also recorded: the
service time (from the actual write) and the send lag (write minus schedule), which shows the
generator's own accuracy: a lag that is not small against the latencies means the figures are the
generator's, not the path's.

Closed loop (`--closed`): each connection sends its next request as soon as the previous response has
arrived; latency is from the write.  With one connection this is the pure added latency of each hop.

Efficient for Python: blocking sockets read only when `select` says they are readable (select has
microsecond timeouts; the process asks the kernel for a 1 us timer slack), a prebuilt request, and a
response parser that only looks for the header end and Content-Length.  `--processes K` splits the
connections over K forked processes whose histograms are merged.

    python -m bench.loadgen --target 10.96.0.10:80 --rate 1000 --connections 16 --duration 30
    python -m bench.loadgen --target 10.96.0.10:80 --closed --connections 1 --duration 10

Prints one JSON object: latency / service / lag histograms and their percentiles (microseconds),
counts of requests sent, completed and failed (by reason), achieved rate, and the client's CPU seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.histogram import Histogram

PR_SET_TIMERSLACK = 29
RECV_SIZE = 65536
CONNECT_TIMEOUT = 5.0
DRAIN_GRACE = 2.0  # seconds after the last scheduled request before what is still out counts as failed
START_DELAY_NS = 20_000_000


@dataclass(frozen=True)
class Schedule:
    """When each request of an open-loop run is due, and on which connection."""

    rate: float  # requests per second, overall
    connections: int
    duration: float  # seconds

    @property
    def count(self) -> int:
        return int(round(self.rate * self.duration))

    def offset_ns(self, i: int) -> int:
        return int(i * 1e9 / self.rate)

    def connection_of(self, i: int) -> int:
        return i % self.connections

    def requests(self, connections: frozenset[int] | None = None) -> Iterator[tuple[int, int, int]]:
        """(request number, connection, offset in ns from the start) in time order, only for
        `connections` when given (a worker process's share)."""
        for i in range(self.count):
            c = self.connection_of(i)
            if connections is None or c in connections:
                yield i, c, self.offset_ns(i)


@dataclass
class Result:
    latency: Histogram = field(default_factory=Histogram)  # from the scheduled time (open) or the write (closed)
    service: Histogram = field(default_factory=Histogram)  # from the write
    lag: Histogram = field(default_factory=Histogram)  # write minus schedule
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    cpu_seconds: float = 0.0

    def error(self, reason: str, n: int = 1) -> None:
        if n:
            self.errors[reason] = self.errors.get(reason, 0) + n

    def merge(self, other: Result) -> None:
        self.latency.merge(other.latency)
        self.service.merge(other.service)
        self.lag.merge(other.lag)
        self.sent += other.sent
        self.completed += other.completed
        for k, n in other.errors.items():
            self.error(k, n)
        self.elapsed = max(self.elapsed, other.elapsed)
        self.cpu_seconds += other.cpu_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "completed": self.completed, "errors": dict(self.errors),
            "error_count": sum(self.errors.values()), "elapsed": round(self.elapsed, 3),
            "achieved_rps": round(self.completed / self.elapsed, 1) if self.elapsed else 0.0,
            "client_cpu_seconds": round(self.cpu_seconds, 3),
            "latency_us": self.latency.summary(), "service_us": self.service.summary(),
            "lag_us": self.lag.summary(),
            "histograms": {"latency": self.latency.to_json(), "service": self.service.to_json(),
                           "lag": self.lag.to_json()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        h = data["histograms"]
        return cls(latency=Histogram.from_json(h["latency"]), service=Histogram.from_json(h["service"]),
                   lag=Histogram.from_json(h["lag"]), sent=data["sent"], completed=data["completed"],
                   errors=dict(data["errors"]), elapsed=data["elapsed"], cpu_seconds=data["client_cpu_seconds"])


def build_request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-bench\r\nAccept: */*\r\n\r\n".encode()


def parse_response(buf: bytearray) -> tuple[int, int] | None:
    """If `buf` starts with a whole response, (status, its length in bytes); None while incomplete.
    Raises ValueError for bytes that are not an HTTP/1.1 response with a Content-Length."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise ValueError("response head larger than 64 KiB")
        return None
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1."):
        raise ValueError(f"not an HTTP response: {bytes(buf[:40])!r}")
    status = int(head[9:12])
    pos = head.find(b"\r\ncontent-length:")
    if pos < 0:
        raise ValueError("response without Content-Length")
    line_end = head.find(b"\r\n", pos + 2)
    length = int(head[pos + 17:line_end if line_end >= 0 else None].strip())
    total = end + 4 + length
    return (status, total) if len(buf) >= total else None


class Connection:
    """One keep-alive connection: at most one request in flight, a queue of requests due behind it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.inflight: tuple[int, int] | None = None  # (scheduled ns, written ns)
        self.backlog: deque[int] = deque()  # scheduled ns of requests waiting for this connection

    def open(self) -> socket.socket:
        sock = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.sock = sock
        self.buf.clear()
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf.clear()
        self.inflight = None


def _set_timer_slack() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except OSError:
        pass


def run_open(target: tuple[str, int], schedule: Schedule, request: bytes,
             connections: frozenset[int] | None = None) -> Result:
    """Drive the open-loop schedule (or the share of it on `connections`) and measure."""
    res = Result()
    mine = sorted(connections) if connections is not None else list(range(schedule.connections))
    conns = {c: Connection(target) for c in mine}
    by_fd: dict[int, Connection] = {}

    def write(conn: Connection, scheduled: int) -> None:
        if conn.sock is None:
            try:
                by_fd[conn.open().fileno()] = conn
            except OSError as exc:
                res.error(f"connect: {exc.strerror or exc}")
                return
        assert conn.sock is not None
        now = time.monotonic_ns()
        try:
            conn.sock.sendall(request)
        except OSError as exc:
            res.error(f"send: {exc.strerror or exc}")
            _drop(conn)
            return
        res.sent += 1
        res.lag.record((now - scheduled) // 1000)
        conn.inflight = (scheduled, now)

    def _drop(conn: Connection) -> None:
        if conn.sock is not None:
            by_fd.pop(conn.sock.fileno(), None)
        conn.close()

    for conn in conns.values():
        try:
            by_fd[conn.open().fileno()] = conn
        except OSError as exc:
            res.error(f"connect: {exc.strerror or exc}")
    plan = schedule.requests(connections)
    upcoming = next(plan, None)
    t0 = time.monotonic_ns() + START_DELAY_NS
    end = t0 + schedule.offset_ns(schedule.count) + int(DRAIN_GRACE * 1e9)
    cpu0 = _cpu()
    while True:
        now = time.monotonic_ns()
        while upcoming is not None and t0 + upcoming[2] <= now:
            _, c, offset = upcoming
            conn = conns[c]
            if conn.inflight is None:
                write(conn, t0 + offset)
            else:
                conn.backlog.append(t0 + offset)
            upcoming = next(plan, None)
        busy = any(c.inflight is not None or c.backlog for c in conns.values())
        if upcoming is None and not busy:
            break
        if now >= end:
            break
        timeout = max(0.0, (t0 + upcoming[2] - now) / 1e9) if upcoming is not None else (end - now) / 1e9
        for conn in conns.values():
            if conn.sock is None and conn.inflight is None and conn.backlog:
                write(conn, conn.backlog.popleft())  # reconnect for the requests queued on it
        if not by_fd:
            time.sleep(min(timeout, 0.01))  # every connection failed: retry soon, without spinning
            continue
        readable, _, _ = select.select(list(by_fd), [], [], timeout)
        for fd in readable:
            conn = by_fd[fd]
            assert conn.sock is not None
            try:
                data = conn.sock.recv(RECV_SIZE)
            except OSError as exc:
                data = b""
                res.error(f"recv: {exc.strerror or exc}")
            if not data:
                if conn.inflight is not None:
                    res.error("connection closed with a request in flight")
                _drop(conn)
                if conn.backlog:
                    write(conn, conn.backlog.popleft())
                continue
            conn.buf += data
            while conn.inflight is not None:
                try:
                    parsed = parse_response(conn.buf)
                except ValueError as exc:
                    res.error(f"bad response: {exc}")
                    _drop(conn)
                    break
                if parsed is None:
                    break
                status, length = parsed
                del conn.buf[:length]
                done = time.monotonic_ns()
                scheduled, written = conn.inflight
                conn.inflight = None
                if status == 200:
                    res.completed += 1
                    res.latency.record((done - scheduled) // 1000)
                    res.service.record((done - written) // 1000)
                else:
                    res.error(f"HTTP {status}")
                if conn.backlog:
                    write(conn, conn.backlog.popleft())
            if conn.sock is None and conn.backlog:
                write(conn, conn.backlog.popleft())
    for conn in conns.values():
        if conn.inflight is not None:
            res.error("timed out")
        res.error("never sent (queued behind a stalled connection)", len(conn.backlog))
        conn.close()
    if upcoming is not None:
        res.error("never sent (the run ended first)", 1 + sum(1 for _ in plan))
    res.elapsed = (min(time.monotonic_ns(), end) - t0) / 1e9
    res.cpu_seconds = _cpu() - cpu0
    return res


def run_closed(target: tuple[str, int], connections: int, duration: float, request: bytes) -> Result:
    """Each connection sends its next request when the previous response has arrived."""
    res = Result()
    conns = [Connection(target) for _ in range(connections)]
    by_fd: dict[int, Connection] = {}
    for conn in conns:
        by_fd[conn.open().fileno()] = conn
    cpu0 = _cpu()
    t0 = time.monotonic_ns()
    end = t0 + int(duration * 1e9)

    def write(conn: Connection) -> None:
        if conn.sock is None:
            by_fd[conn.open().fileno()] = conn
        assert conn.sock is not None
        now = time.monotonic_ns()
        conn.sock.sendall(request)
        res.sent += 1
        conn.inflight = (now, now)

    for conn in conns:
        write(conn)
    while by_fd:
        now = time.monotonic_ns()
        if now >= end + int(DRAIN_GRACE * 1e9):
            break
        readable, _, _ = select.select(list(by_fd), [], [], 0.5)
        for fd in readable:
            conn = by_fd[fd]
            assert conn.sock is not None
            try:
                data = conn.sock.recv(RECV_SIZE)
            except OSError:
                data = b""
            if not data:
                res.error("connection closed with a request in flight")
                by_fd.pop(fd)
                conn.close()
                if time.monotonic_ns() < end:
                    try:
                        write(conn)
                    except OSError as exc:
                        res.error(f"connect: {exc.strerror or exc}")
                continue
            conn.buf += data
            try:
                parsed = parse_response(conn.buf)
            except ValueError as exc:
                res.error(f"bad response: {exc}")
                by_fd.pop(fd)
                conn.close()
                continue
            if parsed is None:
                continue
            status, length = parsed
            del conn.buf[:length]
            done = time.monotonic_ns()
            assert conn.inflight is not None
            _, written = conn.inflight
            conn.inflight = None
            if status == 200:
                res.completed += 1
                res.latency.record((done - written) // 1000)
                res.service.record((done - written) // 1000)
                res.lag.record(0)
            else:
                res.error(f"HTTP {status}")
            if done < end:
                write(conn)
            else:
                by_fd.pop(fd)
                conn.close()
    for conn in conns:
        if conn.inflight is not None:
            res.error("timed out")
        conn.close()
    res.elapsed = min(duration, (time.monotonic_ns() - t0) / 1e9)
    res.cpu_seconds = _cpu() - cpu0
    return res


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_open_processes(target: tuple[str, int], schedule: Schedule, request: bytes, processes: int) -> Result:
    """Split the connections over `processes` forked workers and merge what they measured."""
    if processes <= 1:
        return run_open(target, schedule, request)
    shares = [frozenset(c for c in range(schedule.connections) if c % processes == k) for k in range(processes)]
    children: list[tuple[int, int]] = []
    for share in shares:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                out = json.dumps(run_open(target, schedule, request, share).to_json()).encode()
                with os.fdopen(w, "wb") as f:
                    f.write(out)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    total = Result()
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        if data:
            total.merge(Result.from_json(json.loads(data)))
        else:
            total.error("a worker process failed")
    return total


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, type=parse_target, metavar="HOST:PORT")
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second, open loop (default 1000)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--closed", action="store_true", help="closed loop instead of a fixed rate")
    p.add_argument("--processes", type=int, default=1, help="worker processes for the open loop (default 1)")
    args = p.parse_args(argv)
    _set_timer_slack()
    request = build_request(f"{args.target[0]}:{args.target[1]}", args.path)
    try:
        if args.closed:
            result = run_closed(args.target, args.connections, args.duration, request)
        else:
            schedule = Schedule(args.rate, args.connections, args.duration)
            result = run_open_processes(args.target, schedule, request, args.processes)
    except OSError as exc:
        print(json.dumps({"fatal": f"{args.target[0]}:{args.target[1]}: {exc.strerror or exc}"}))
        return 1
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
