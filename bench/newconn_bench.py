"""New connections at a fixed rate: every request opens a TCP connection of its own (open loop).

Connection *i* is due at `start + i / rate`: at that time a non-blocking `connect()` starts, the request
(`Connection: close`) is written once it is connected, and the connection is done when the whole
response has arrived; the client then closes it.  Its latency counts from the *scheduled* time, so a
generator or path that falls behind shows up in every connection it delays (no coordinated omission),
and connections overlap as they would from many clients.  Also recorded: the connect time (scheduled
time to connected) and the send lag (when the generator actually called `connect()` minus the schedule:
its own accuracy).

    python -m bench.newconn_bench --target 10.97.0.10:80 --rate 200 --duration 10
    python -m bench.newconn_bench --target 10.97.0.10:80 --first      # one connection, retried until it works

Prints one JSON object, the shape `bench.loadgen` prints (latency / service / lag histograms and their
percentiles in microseconds, sent, completed, errors by reason, achieved rate, the client's CPU seconds),
plus `connect_us`.  `--first` measures the first connection of a freshly configured path: it retries a
refused or reset connection (the path may not be up yet) for `--timeout` seconds and reports the first
that completes.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import sys
import time
from dataclasses import dataclass, field

from bench.histogram import Histogram
from bench.loadgen import RECV_SIZE, Result, _cpu, _set_timer_slack, parse_response, parse_target

START_DELAY_NS = 20_000_000
DRAIN_GRACE = 2.0  # seconds after the last scheduled connection before what is still open counts as failed
MAX_OPEN = 4000  # connections in progress at once; one due beyond that is counted as not sent


@dataclass
class _Attempt:
    sock: socket.socket
    scheduled: int
    started: int
    connected: int = 0
    buf: bytearray = field(default_factory=bytearray)


@dataclass
class NewConnResult(Result):
    connect: Histogram = field(default_factory=Histogram)

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        out["connect_us"] = self.connect.summary()
        return out


def request_bytes(host: str, port: int) -> bytes:
    return (f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mesh-bench\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n").encode()


def run(target: tuple[str, int], rate: float, duration: float, request: bytes) -> NewConnResult:
    """Open `rate * duration` connections on schedule, one request each; measure."""
    res = NewConnResult()
    count = int(round(rate * duration))
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    ep = select.epoll()
    open_: dict[int, _Attempt] = {}

    def drop(fd: int) -> None:
        att = open_.pop(fd)
        ep.unregister(fd)
        att.sock.close()

    def start(scheduled: int) -> None:
        if len(open_) >= MAX_OPEN:
            res.error(f"never sent ({MAX_OPEN} connections already in progress)")
            return
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic_ns()
        code = sock.connect_ex(target)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            res.error(f"connect: {errno.errorcode.get(code, code)}")
            return
        res.lag.record(max(0, now - scheduled) // 1000)
        open_[sock.fileno()] = _Attempt(sock, scheduled, now)
        ep.register(sock.fileno(), select.EPOLLOUT)

    i = 0
    t0 = time.monotonic_ns() + START_DELAY_NS
    end = t0 + int(count * 1e9 / rate) + int(DRAIN_GRACE * 1e9) if rate > 0 else t0
    cpu0 = _cpu()
    while True:
        now = time.monotonic_ns()
        while i < count and t0 + int(i * 1e9 / rate) <= now:
            start(t0 + int(i * 1e9 / rate))
            i += 1
        if (i >= count and not open_) or now >= end:
            break
        due = t0 + int(i * 1e9 / rate) if i < count else end
        # epoll waits whole milliseconds: wait the whole ones, then the rest in short sleeps.
        wait_ms = (due - now) // 1_000_000
        events = ep.poll(wait_ms / 1e3 if wait_ms > 0 else 0)
        if not events and wait_ms <= 0:
            time.sleep(min(max(0, due - now), 200_000) / 1e9)
        for fd, _ in events:
            att = open_.get(fd)
            if att is None:
                continue
            if not att.connected:
                err = att.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    res.error(f"connect: {errno.errorcode.get(err, err)}")
                    drop(fd)
                    continue
                att.connected = time.monotonic_ns()
                res.connect.record((att.connected - att.scheduled) // 1000)
                try:
                    att.sock.send(request)  # a small request into an empty send buffer goes whole
                except OSError as exc:
                    res.error(f"send: {exc.strerror or exc}")
                    drop(fd)
                    continue
                res.sent += 1
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = att.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                res.error(f"recv: {exc.strerror or exc}")
                drop(fd)
                continue
            if not data:
                res.error("connection closed before the whole response")
                drop(fd)
                continue
            att.buf += data
            try:
                parsed = parse_response(att.buf)
            except ValueError as exc:
                res.error(f"bad response: {exc}")
                drop(fd)
                continue
            if parsed is None:
                continue
            done = time.monotonic_ns()
            if parsed[0] == 200:
                res.completed += 1
                res.latency.record((done - att.scheduled) // 1000)
                res.service.record((done - att.started) // 1000)
            else:
                res.error(f"HTTP {parsed[0]}")
            drop(fd)
    res.error("timed out", len(open_))
    for fd in list(open_):
        drop(fd)
    res.error("never sent (the run ended first)", count - i)
    ep.close()
    res.elapsed = (min(time.monotonic_ns(), end) - t0) / 1e9 if count else 0.0
    res.cpu_seconds = _cpu() - cpu0
    return res


def first(target: tuple[str, int], request: bytes, timeout: float) -> NewConnResult:
    """The first connection that completes within `timeout` seconds (refusals and resets are retried)."""
    deadline = time.monotonic() + timeout
    last = NewConnResult()
    while time.monotonic() < deadline:
        last = run(target, 1000.0, 0.001, request)
        if last.completed:
            return last
        time.sleep(0.05)
    return last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.newconn_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, type=parse_target, metavar="HOST:PORT")
    p.add_argument("--rate", type=float, default=200.0, help="new connections per second (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--first", action="store_true", help="only the first connection that completes")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to retry with --first (default 10)")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be positive")
    _set_timer_slack()
    request = request_bytes(*args.target)
    result = first(args.target, request, args.timeout) if args.first else run(args.target, args.rate,
                                                                                args.duration, request)
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
