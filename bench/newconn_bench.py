"""New connections: one HTTP/1.1 request per TCP connection, one after the other, timed from connect()
until the whole answer has arrived (what a client without keep-alive pays for each request).

    python -m bench.newconn_bench --target 10.97.0.10:80 [--count 500] [--warmup 20]

Standard library only (it runs in a pod).  Prints one JSON object: count, failures, and the latency
p50 / p90 / p99 / mean in microseconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def one(target: tuple[str, int], request: bytes, timeout: float) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(target, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        data = b""
        need = -1
        while need < 0 or len(data) < need:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if need < 0 and b"\r\n\r\n" in data:
                head, _, _ = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                need = len(head) + 4 + length
        if need < 0 or len(data) < need:
            raise OSError("short answer")
    return (time.perf_counter() - t0) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    samples: list[float] = []
    failures = 0
    for i in range(args.warmup + args.count):
        try:
            took = one(target, request, args.timeout)
        except OSError:
            failures += 1
            continue
        if i >= args.warmup:
            samples.append(took)
    samples.sort()

    def pct(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q / 100 * len(samples)))], 1) if samples else 0.0

    print(json.dumps({"count": len(samples), "failures": failures, "p50_us": pct(50), "p90_us": pct(90),
                      "p99_us": pct(99), "mean_us": round(sum(samples) / len(samples), 1) if samples else 0.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
