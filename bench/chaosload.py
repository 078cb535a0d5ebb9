"""Steady HTTP load for the chaos run (`bench.chaos`), run inside a pod: standard library only.

    python chaosload.py --target reviews:9080/reviews/0 --target ratings:9080/ratings/0 \\
        [--rate 200] [--connections 32] [--duration 600] [--timeout 3]

Open loop: request *i* is due at `start + i / rate`, on the targets in turn, and taken by the first free
one of `connections` kept-alive HTTP/1.1 connections (a failed one is dropped, and its next request
connects again).  A request fails on any error, a timeout, or a status other than 200.  Every second it
prints one JSON line about the requests that finished in that second:

    {"t": <Unix second>, "sent": n, "ok": n, "failed": n, "errors": {"<reason>": n}, "fail_first": t, "fail_last": t}

(`fail_*` only when some failed), so the run can be followed live and cut into windows afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Second:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fail_first: float = 0.0
    fail_last: float = 0.0


class Tally:
    def __init__(self) -> None:
        self.seconds: dict[int, Second] = {}

    def done(self, error: str | None) -> None:
        now = time.time()
        s = self.seconds.setdefault(int(now), Second())
        s.sent += 1
        if error is None:
            s.ok += 1
            return
        s.failed += 1
        s.errors[error] += 1
        s.fail_first = s.fail_first or now
        s.fail_last = now

    def flush(self, before: int) -> None:
        for t in sorted(k for k in self.seconds if k < before):
            s = self.seconds.pop(t)
            line = {"t": t, "sent": s.sent, "ok": s.ok, "failed": s.failed, "errors": dict(s.errors)}
            if s.failed:
                line.update(fail_first=round(s.fail_first, 3), fail_last=round(s.fail_last, 3))
            print(json.dumps(line), flush=True)


class Connection:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.streams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def get(self, host: str, port: int, path: str) -> str | None:
        """One GET on the kept-alive connection to host:port; None when it answered 200, else why not."""
        key = f"{host}:{port}"
        try:
            return await asyncio.wait_for(self._get(key, host, port, path), self.timeout)
        except TimeoutError:
            self._drop(key)
            return "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self._drop(key)
            return type(exc).__name__

    async def _get(self, key: str, host: str, port: int, path: str) -> str | None:
        if key not in self.streams:
            self.streams[key] = await asyncio.open_connection(host, port)
        reader, writer = self.streams[key]
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {key}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                close = True
        await reader.readexactly(length)
        if close:
            self._drop(key)
        return None if status == 200 else f"status {status}"

    def _drop(self, key: str) -> None:
        stream = self.streams.pop(key, None)
        if stream is not None:
            stream[1].close()


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    targets = []
    for target in args.target:
        where, _, path = target.partition("/")
        host, _, port = where.rpartition(":")
        targets.append((host, int(port), "/" + path))
    tally = Tally()
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def worker() -> None:
        conn = Connection(args.timeout)
        while True:
            i = await queue.get()
            host, port, path = targets[i % len(targets)]
            tally.done(await conn.get(host, port, path))

    workers = [asyncio.ensure_future(worker()) for _ in range(args.connections)]
    start, i = time.monotonic(), 0
    end = start + args.duration
    while (now := time.monotonic()) < end:
        due = int((now - start) * args.rate)
        while i < due:
            queue.put_nowait(i)
            i += 1
        tally.flush(int(time.time()))
        await asyncio.sleep(0.005)
    await asyncio.sleep(args.timeout + 0.5)
    tally.flush(sys.maxsize)
    for w in workers:
        w.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", required=True, metavar="HOST:PORT/PATH")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=3.0)
    asyncio.run(main(p.parse_args()))
