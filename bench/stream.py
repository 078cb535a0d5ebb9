"""One TCP stream through the path: send N bytes to the server's sink and time it (MB/s).

The sender writes an 8-byte big-endian length and then the bytes, in 1 MiB writes from one buffer;
the sink (bench/server.py) answers with the same 8 bytes once everything has arrived, so the time runs
from connect until the last byte is known to be delivered to the server application, not merely queued.

    python -m bench.stream --target 10.96.0.11:9000 --bytes 268435456

Prints one JSON object: bytes, seconds, MB/s (10^6 bytes per second), client CPU seconds, or an error.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import struct
import sys
import time

CHUNK = 1 << 20


def send_stream(target: tuple[str, int], total: int, timeout: float = 120.0) -> dict[str, float | int | str]:
    payload = memoryview(bytes(CHUNK))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    with socket.create_connection(target, timeout=timeout) as sock:
        header = struct.pack("!Q", total)
        sock.sendall(header)
        remaining = total
        while remaining > 0:
            n = min(CHUNK, remaining)
            sock.sendall(payload[:n])
            remaining -= n
        echo = b""
        while len(echo) < 8:
            chunk = sock.recv(8 - len(echo))
            if not chunk:
                return {"error": f"the sink closed the stream after {total - remaining} bytes without confirming"}
            echo += chunk
    seconds = time.monotonic() - t0
    if echo != header:
        return {"error": f"the sink confirmed {struct.unpack('!Q', echo)[0]} bytes, not {total}"}
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"bytes": total, "seconds": round(seconds, 4), "mb_per_s": round(total / 1e6 / seconds, 1),
            "client_cpu_seconds": round(cpu, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--bytes", type=int, default=256 << 20)
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        result = send_stream((host, int(port)), args.bytes)
    except OSError as exc:
        result = {"error": f"{args.target}: {exc.strerror or exc}"}
    print(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
