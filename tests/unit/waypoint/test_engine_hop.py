"""The waypoint's hop on the engine (`waypoint.engine.hop`), assembled as the bench's proxy
process assembles it, against a tiny backend on the same loop: requests answered with the backend's
body over one pooled upstream connection, and each one recorded in the access log and the metrics."""

from __future__ import annotations

import asyncio
import json
import time

import uvloop

from bench.ports import free_port as _free_port
from bench.waypoint_bench import bench_table, client_info
from waypoint.engine.hop import EngineHop
from waypoint.proxy import WaypointProxy
from waypoint.upstream.pool import TcpUpstream

BODY = b"hello from the backend"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
REQUEST = b"GET /a HTTP/1.1\r\nHost: 10.96.0.77\r\nUser-Agent: test\r\n\r\n"


class _Backend(asyncio.Protocol):
    """Answers every request head with `RESPONSE`; counts its connections and what they received."""

    connections = 0
    received: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections += 1
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            type(self).received.append(head)
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, bytes]:
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def _run(backend_port: int, listen_backend: bool) -> tuple[list[tuple[bytes, bytes]], list[str], WaypointProxy, EngineHop]:
    loop = uvloop.new_event_loop()
    lines: list[str] = []
    proxy = WaypointProxy(TcpUpstream(), bench_table(backend_port), access_log=lines.append, clock=time.monotonic)
    hop = EngineHop(proxy, loop, client_info)

    async def main() -> list[tuple[bytes, bytes]]:
        if listen_backend:
            await loop.create_server(_Backend, "127.0.0.1", backend_port)
        front = await hop.serve("127.0.0.1", 0)
        port = front.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = [await _exchange(reader, writer), await _exchange(reader, writer)]
        writer.close()
        return answers

    try:
        return loop.run_until_complete(main()), lines, proxy, hop
    finally:
        loop.close()


def test_requests_are_forwarded_on_one_pooled_connection_and_recorded() -> None:
    _Backend.connections, _Backend.received = 0, []
    port = _free_port()
    answers, lines, proxy, hop = _run(port, listen_backend=True)
    for head, body in answers:
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == BODY
    assert _Backend.connections == 1 and hop.pool.opened == 1  # the second request reused the first's
    sent = _Backend.received[0].decode().split("\r\n")
    assert sent[0] == "GET /a HTTP/1.1" and "host: 10.96.0.77" in sent and "x-forwarded-proto: http" in sent
    assert any(h.startswith("x-request-id: ") for h in sent) and any(h.startswith("traceparent: 00-") for h in sent)
    records = [json.loads(line) for line in lines]
    assert len(records) == 2
    first = records[0]
    assert first["response_code"] == 200 and first["response_flags"] == "-" and first["route_name"] == "default"
    assert first["upstream_host"] == f"127.0.0.1:{port}" and first["bytes_sent"] == len(BODY)
    assert first["upstream_cluster"] == "outbound|80||server.bench.svc.cluster.local" and first["attempts"] == 1
    count = proxy.metrics.registry.get_sample_value("istio_requests_total", _labels(proxy, "200", "-"))
    assert count == 2


def test_an_endpoint_that_refuses_is_retried_then_answered_503_uf() -> None:
    answers, lines, proxy, _ = _run(_free_port(), listen_backend=False)
    assert all(head.startswith(b"HTTP/1.1 503 ") for head, _ in answers)
    record = json.loads(lines[0])
    assert record["response_flags"] == "UF" and record["attempts"] == 3  # (retryOn connect-failure, 2 retries)
    assert proxy.metrics.registry.get_sample_value("istio_requests_total", _labels(proxy, "503", "UF")) == 2


def _labels(proxy: WaypointProxy, code: str, flags: str) -> dict[str, str]:
    """The label set of the one request series with this code and these flags."""
    for metric in proxy.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "istio_requests_total" and sample.labels.get("response_code") == code \
                    and sample.labels.get("response_flags") == flags:
                assert sample.labels["reporter"] == "waypoint"
                assert sample.labels["destination_service"] == "server.bench.svc.cluster.local"
                return dict(sample.labels)
    raise AssertionError(f"no istio_requests_total series with response_code {code} and flags {flags}")
