"""gRPC through the waypoint on loopback: a real grpcio client and server, the proxy in between (HTTP/2
both ways).  Unary, server- and bidirectional streaming, a non-OK status in the trailers, fault abort
with grpcStatus, retry on `unavailable`, the route's timeout as Envoy answers it, `grpc-timeout`, and a
route timeout counted by outlier detection."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import trio

from tests.unit.waypoint.test_http2_upstream import grpc_service, start_peer
from tests.unit.waypoint.waypoint_harness import logged, running_proxy, table, workload
from tests.unit.waypoint.waypoint_resources import l7
from waypoint.http.exchange import iterate
from waypoint.http.http2_client import Http2Client
from waypoint.l7.model import RequestHead

HOST = "echo.bookinfo.svc.cluster.local"
VIP = "10.96.0.30"


class EchoServer:
    """A grpcio server of `t.Echo` with bytes messages (no .proto): Say, Flaky, Fail, Slow, Stream, Chat."""

    def __init__(self, stall: bool = False) -> None:
        self.stall = stall  # Say never answers (until `stop`)
        self.calls: dict[str, int] = {}
        self.peers: set[str] = set()
        self.stop = threading.Event()
        self.cancelled = threading.Event()  # a Wait call ended because its client gave up
        self._lock = threading.Lock()
        u, s = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        handler = grpc.method_handlers_generic_handler("t.Echo", {
            "Say": u(self.say), "Flaky": u(self.flaky), "Fail": u(self.fail), "Slow": u(self.slow),
            "Stream": s(self.stream), "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Wait": u(self.wait)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _count(self, name: str, context: grpc.ServicerContext) -> int:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.peers.add(context.peer())
            return self.calls[name]

    def say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Say", context)
        if self.stall:
            self.stop.wait(10)
        return b"hi " + request

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self._count("Flaky", context) < 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b"third time " + request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Fail", context)
        context.set_trailing_metadata((("x-why", "because"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no good: " + request.decode())
        raise AssertionError("abort returns by raising")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Slow", context)
        self.stop.wait(10)
        return b"late"

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Stream", context)
        for i in range(int(request)):
            yield f"part {i}".encode()

    def wait(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Waits until the client gives up on the call (recorded in `cancelled`)."""
        self._count("Wait", context)
        gone = threading.Event()
        context.add_callback(gone.set)
        gone.wait(10)
        self.cancelled.set()
        return b"too late"

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Chat", context)
        for message in requests:
            yield b"re: " + message


def run(fn: Callable[[], Awaitable[None]], limit: float = 20.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()
    trio.run(main)


def _vs(*routes: dict[str, Any]) -> Any:
    return l7("VirtualService", "echo", {"hosts": ["echo"], "http": list(routes)}, [HOST])


def _route(prefix: str, **extra: Any) -> dict[str, Any]:
    return {"match": [{"uri": {"prefix": prefix}}], "route": [{"destination": {"host": "echo"}}], **extra}


def _proxied(server: EchoServer, *routes: dict[str, Any]) -> Any:
    wls = [workload("echo-v1", "echo", "v1", server.port)]
    return running_proxy(table([grpc_service("echo", VIP)], wls, [_vs(*routes)] if routes else []),
                         destination=f"{VIP}:9080")


def test_unary_streaming_and_status_trailers_pass_through() -> None:
    server = EchoServer()
    server.server.start()

    def calls(port: int) -> dict[str, Any]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            out: dict[str, Any] = {"say": ch.unary_unary("/t.Echo/Say")(b"there", timeout=5)}
            out["stream"] = list(ch.unary_stream("/t.Echo/Stream")(b"5", timeout=5))
            # bidi, one message at a time: each answer must come back before the next is sent
            sent: list[bytes] = []
            ready = threading.Semaphore(1)

            def messages() -> Iterator[bytes]:
                for i in range(4):
                    ready.acquire()
                    sent.append(f"m{i}".encode())
                    yield sent[-1]
            replies = []
            for reply in ch.stream_stream("/t.Echo/Chat")(messages(), timeout=5):
                replies.append(reply)
                ready.release()
            out["chat"] = replies
            try:
                ch.unary_unary("/t.Echo/Fail")(b"x", timeout=5)
            except grpc.RpcError as exc:
                out["fail"] = (exc.code(), exc.details(), dict(exc.trailing_metadata() or ()))
            return out

    async def main() -> None:
        async with _proxied(server) as (_proxy, front, log, _n):
            out = await trio.to_thread.run_sync(calls, front.port)
            assert out["say"] == b"hi there"
            assert out["stream"] == [f"part {i}".encode() for i in range(5)]
            assert out["chat"] == [b"re: m0", b"re: m1", b"re: m2", b"re: m3"]
            code, details, trailers = out["fail"]
            assert code == grpc.StatusCode.FAILED_PRECONDITION and details == "no good: x"
            assert trailers.get("x-why") == "because"
            entry = await logged(log)
            assert entry["response_code"] == 200 and entry["protocol"] == "HTTP/2"
    try:
        run(main)
    finally:
        server.server.stop(0)


def test_fault_abort_with_grpc_status_and_retry_on_unavailable() -> None:
    server = EchoServer()
    server.server.start()

    def calls(port: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                ch.unary_unary("/t.Echo/Say")(b"x", timeout=5)
            except grpc.RpcError as exc:
                out["abort"] = (exc.code(), exc.details())
            out["flaky"] = ch.unary_unary("/t.Echo/Flaky")(b"lucky", timeout=5)
        return out

    async def main() -> None:
        routes = (_route("/t.Echo/Say", fault={"abort": {"grpcStatus": "RESOURCE_EXHAUSTED", "percentage": {"value": 100}}}),
                  _route("/t.Echo/Flaky", retries={"attempts": 3, "retryOn": "unavailable"}))
        async with _proxied(server, *routes) as (_proxy, front, log, _n):
            out = await trio.to_thread.run_sync(calls, front.port)
            assert out["abort"] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "fault filter abort")
            assert "Say" not in server.calls  # the abort answered it: the server never saw it
            assert out["flaky"] == b"third time lucky" and server.calls["Flaky"] == 3
            assert (await logged(log, 1))["response_flags"] == "FI"
            assert (await logged(log, 2))["attempts"] == 3
    try:
        run(main)
    finally:
        server.server.stop(0)


def test_route_timeout_answers_as_envoy_and_grpc_timeout_is_honoured() -> None:
    server = EchoServer()
    server.server.start()

    def slow(port: int) -> tuple[Any, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                ch.unary_unary("/t.Echo/Slow")(b"x", timeout=5)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
        return None, ""

    async def raw_call(port: int, timeout_header: str) -> tuple[int, dict[str, str]]:
        client = Http2Client(await trio.open_tcp_stream("127.0.0.1", port))
        try:
            await client.send_request(RequestHead("POST", "/hold", "echo:9080", (
                ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", timeout_header)),
                protocol="HTTP/2"), iterate(b"\0\0\0\0\1x"))
            head = await client.receive_response()
            return head.status, dict(head.headers)
        finally:
            await client.aclose()

    async def main() -> None:
        async with _proxied(server, _route("/t.Echo/Slow", timeout="0.3s")) as (_proxy, front, log, _n):
            # the route's timeout: HTTP 200, trailers-only, UNAVAILABLE "upstream request timeout" (as Envoy)
            assert await trio.to_thread.run_sync(slow, front.port) == (
                grpc.StatusCode.UNAVAILABLE, "upstream request timeout")
            assert (await logged(log, 1))["response_flags"] == "UT"
        # no route timeout: the request's grpc-timeout rules (toward an h2 server that ignores it)
        async with trio.open_nursery() as n:
            peer = await start_peer(n)
            tbl = table([grpc_service("echo", VIP)], [workload("echo-v1", "echo", "v1", peer.port)], [])
            async with running_proxy(tbl, destination=f"{VIP}:9080") as (_proxy, front, log, _n):
                status, headers = await raw_call(front.port, "200m")
                assert status == 200 and headers["grpc-status"] == "14"
                assert headers["grpc-message"] == "upstream request timeout"
                assert (await logged(log, 1))["response_flags"] == "UT"
                assert peer.holding == 1  # the request did reach the server
            peer.release.set()
            n.cancel_scope.cancel()
    try:
        run(main)
    finally:
        server.stop.set()
        server.server.stop(0)


def test_route_timeouts_count_for_outlier_detection() -> None:
    """A stalled endpoint, a 0.3 s route timeout and no retries: each timeout counts as a 5xx, so the
    endpoint is ejected after consecutive5xxErrors and the healthy one takes every request."""
    stalled, healthy = EchoServer(stall=True), EchoServer()
    for s in (stalled, healthy):
        s.server.start()

    async def main() -> None:
        dr = l7("DestinationRule", "echo", {"host": "echo", "trafficPolicy": {"outlierDetection": {
            "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s", "maxEjectionPercent": 100},
            "loadBalancer": {"simple": "ROUND_ROBIN"}}}, [HOST])
        wls = [workload("echo-stalled", "echo", "v1", stalled.port), workload("echo-healthy", "echo", "v1", healthy.port)]
        vs = _vs(_route("/", timeout="0.3s", retries={"attempts": 0}))
        async with running_proxy(table([grpc_service("echo", VIP)], wls, [vs, dr]),
                                 destination=f"{VIP}:9080") as (_proxy, front, log, _n):
            def calls() -> list[Any]:
                codes = []
                with grpc.insecure_channel(f"127.0.0.1:{front.port}") as ch:
                    for _ in range(8):
                        try:
                            ch.unary_unary("/t.Echo/Say")(b"x", timeout=5)
                            codes.append("OK")
                        except grpc.RpcError as exc:
                            codes.append(exc.code())
                return codes
            codes = await trio.to_thread.run_sync(calls)
            timeouts = [c for c in codes if c != "OK"]
            assert len(timeouts) == 2 and codes[-4:] == ["OK"] * 4, codes
    try:
        run(main)
    finally:
        for s in (stalled, healthy):
            s.stop.set()
            s.server.stop(0)


def test_a_call_the_client_cancels_ends_alone_on_the_shared_connection() -> None:
    server = EchoServer()
    server.server.start()

    def calls(port: int) -> dict[str, Any]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            waiting = ch.unary_unary("/t.Echo/Wait").future(b"x", timeout=10)
            while server.calls.get("Wait") != 1:
                threading.Event().wait(0.01)
            during = ch.unary_unary("/t.Echo/Say")(b"during", timeout=5)
            waiting.cancel()  # RST_STREAM from the client: the waypoint resets that stream upstream
            ended = server.cancelled.wait(5)
            after = ch.unary_unary("/t.Echo/Say")(b"after", timeout=5)
            return {"during": during, "after": after, "ended": ended, "cancelled": waiting.cancelled()}

    async def main() -> None:
        async with _proxied(server) as (proxy, front, _log, _n):
            out = await trio.to_thread.run_sync(calls, front.port)
            assert out == {"during": b"hi during", "after": b"hi after", "ended": True, "cancelled": True}
            assert len(server.peers) == 1 and proxy.pool.opened == 1  # one upstream connection throughout
    try:
        run(main)
    finally:
        server.server.stop(0)
