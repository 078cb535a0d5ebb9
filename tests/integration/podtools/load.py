"""Load against an echo server: new connections at a steady rate, plus a few long-lived ones.

    python load.py HOST PORT [--rate 200] [--duration 30] [--stop-file PATH] [--long 3] [--interval 0.2]
                   [--timeout 5]

Each request is one new TCP connection: connect, send a line, read it back, close.  Each long-lived
connection sends a line every INTERVAL seconds and reads it back; when the other side closes it, that is
recorded (when, and whether a line was in flight: "cut") and it connects again.  The load ends after
DURATION seconds, or as soon as PATH exists (`--stop-file`: a test ends it when it has seen what it wanted).
Prints one JSON object, "seconds" being how long the load ran:

    {"seconds", "stopped_by_file", "sent", "ok", "failed", "errors": [[time, error], ...], "p99_ms",
     "slow": [[time, seconds], ...], "long": [{"exchanges", "mismatched", "cut", "closures": [time, ...],
     "reconnect_failures"}]}

Times are Unix times.  Standard library only, so it runs with any Python 3 in a pod.
"""

import argparse
import asyncio
import json
import os
import resource
import time

SLOW = 0.5  # seconds: a request slower than this is listed with when it started

class Results:
    def __init__(self) -> None:
        self.sent = self.ok = self.failed = 0
        self.errors: list[list[object]] = []
        self.latencies: list[float] = []
        self.slow: list[list[float]] = []  # [start time, seconds] of requests slower than SLOW

    def fail(self, error: str) -> None:
        self.failed += 1
        if len(self.errors) < 50:
            self.errors.append([round(time.time(), 3), error])


async def request(host: str, port: int, i: int, timeout: float, results: Results) -> None:
    started = time.monotonic()
    line = f"req {i}\n".encode()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(line)
        await writer.drain()
        got = await asyncio.wait_for(reader.readline(), timeout)
        if got != line:
            results.fail(f"request {i}: got {got!r}")
            return
        results.ok += 1
        took = time.monotonic() - started
        results.latencies.append(took)
        if took > SLOW and len(results.slow) < 50:
            results.slow.append([round(time.time() - took, 3), round(took, 3)])
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        results.fail(f"request {i}: {exc!r}")
    finally:
        if writer is not None:
            writer.close()


class End:
    """When the load ends: DURATION seconds from now, or earlier once the stop file exists."""

    def __init__(self, duration: float, stop_file: str | None) -> None:
        self.at = time.monotonic() + duration
        self.stop_file = stop_file
        self.by_file = False

    def passed(self) -> bool:
        if not self.by_file and self.stop_file and os.path.exists(self.stop_file):
            self.by_file, self.at = True, min(self.at, time.monotonic())
        return time.monotonic() >= self.at


async def long_lived(host: str, port: int, n: int, end: End, interval: float, timeout: float,
                     results: Results) -> dict[str, object]:
    out: dict[str, object] = {"exchanges": 0, "mismatched": 0, "cut": 0, "closures": [], "reconnect_failures": 0}
    j = 0
    while not end.passed():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except Exception as exc:  # noqa: BLE001
            out["reconnect_failures"] += 1  # type: ignore[operator]
            results.fail(f"long {n}: connect: {exc!r}")
            await asyncio.sleep(interval)
            continue
        try:
            while not end.passed():
                j += 1
                line = f"long {n} {j}\n".encode()
                try:
                    writer.write(line)
                    await writer.drain()
                    got = await asyncio.wait_for(reader.readline(), timeout)
                except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    out["closures"].append(round(time.time(), 3))  # type: ignore[attr-defined]
                    out["cut"] += 1  # type: ignore[operator]
                    out.setdefault("why", []).append(repr(exc))  # type: ignore[attr-defined]
                    break
                if got == b"":  # closed between two lines
                    out["closures"].append(round(time.time(), 3))  # type: ignore[attr-defined]
                    break
                out["exchanges"] += 1  # type: ignore[operator]
                if got != line:
                    out["mismatched"] += 1  # type: ignore[operator]
                await asyncio.sleep(interval)
        finally:
            writer.close()
    return out


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = Results()
    end = End(args.duration, args.stop_file)
    longs = [asyncio.ensure_future(long_lived(args.host, args.port, n, end, args.interval, args.timeout, results))
             for n in range(args.long)]
    tasks: set[asyncio.Task[None]] = set()
    start, i = time.monotonic(), 0
    while not end.passed():
        now = time.monotonic()
        due = int((now - start) * args.rate)  # requests due by now: a steady rate, whatever the lag
        while i < due:
            i += 1
            results.sent += 1
            task = asyncio.ensure_future(request(args.host, args.port, i, args.timeout, results))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(min(0.005, 1 / args.rate))
    seconds = time.monotonic() - start
    if tasks:
        await asyncio.wait(tasks)
    long_results = await asyncio.gather(*longs)
    latencies = sorted(results.latencies)
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    print(json.dumps({"seconds": round(seconds, 3), "stopped_by_file": end.by_file, "sent": results.sent,
                      "ok": results.ok, "failed": results.failed, "errors": results.errors,
                      "p99_ms": round(p99, 1), "slow": results.slow, "long": long_results}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--stop-file")
    p.add_argument("--long", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=5.0)
    asyncio.run(main(p.parse_args()))
