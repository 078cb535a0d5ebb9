"""The waypoint's HTTP/1.1 layer alone (`waypoint.http.http1`): CPU microseconds per request, server side
and client side, over in-memory streams (no sockets, no scheduler waits), with the benchmark's request
(`bench/loadgen.py`) and a 1 KiB answer (`bench/server.py`).

    python -m bench.http1_bench [--requests 20000]

Prints one JSON object: `server_us` (parse a request, answer it) and `client_us` (send a request, parse
the answer), each the best of three runs of CPU time divided by the requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

from waypoint.http.exchange import ServerExchange, iterate
from waypoint.http.http1 import Http1Client, Http1Server
from waypoint.l7.model import RequestHead, ResponseHead

REQUEST = b"GET / HTTP/1.1\r\nHost: server.bench:80\r\nUser-Agent: mesh-bench\r\nAccept: */*\r\n\r\n"
BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1024\r\n\r\n" + BODY)


class _Scripted(trio.abc.HalfCloseableStream):
    """Gives `message` `count` times to the reader, then end of stream; swallows what is written."""

    def __init__(self, message: bytes, count: int) -> None:
        self.message = message
        self.left = count
        self.written = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.left <= 0:
            return b""
        self.left -= 1
        return self.message

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def _server(n: int) -> float:
    stream = _Scripted(REQUEST, n)
    served = 0

    async def handler(ex: ServerExchange) -> None:
        nonlocal served
        async for _chunk in ex.body():
            pass
        await ex.send_head(ResponseHead(200, (("content-type", "application/octet-stream"),
                                              ("content-length", str(len(BODY))))))
        await ex.send_data(BODY)
        await ex.end()
        served += 1

    t0 = time.process_time()
    await Http1Server(stream).serve(handler)
    spent = time.process_time() - t0
    if served != n:
        raise SystemExit(f"server answered {served} of {n} requests")
    return spent


async def _client(n: int) -> float:
    stream = _Scripted(RESPONSE, n)
    client = Http1Client(stream)
    head = RequestHead("GET", "/", "server.bench:80", (("user-agent", "mesh-bench"), ("accept", "*/*")))
    t0 = time.process_time()
    for _ in range(n):
        await client.send_request(head, iterate(b""))
        answer = await client.receive_response()
        size = 0
        async for chunk in client.response_body():
            size += len(chunk)
        if answer.status != 200 or size != len(BODY) or not client.reusable:
            raise SystemExit("client: unexpected answer")
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http1_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args(argv)
    n = args.requests
    server = min(trio.run(_server, n) for _ in range(3))
    client = min(trio.run(_client, n) for _ in range(3))
    print(json.dumps({"requests": n, "server_us": round(server / n * 1e6, 2), "client_us": round(client / n * 1e6, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
