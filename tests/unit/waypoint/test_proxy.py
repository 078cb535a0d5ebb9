"""The waypoint over real sockets on 127.0.0.1: HTTP/1.1 and HTTP/2 clients, small HTTP/1.1 backends."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio
from waypoint_harness import (
    WAYPOINT,
    fq,
    logged,
    raw,
    request,
    running_proxy,
    service,
    start_backend,
    table,
    workload,
)
from waypoint_resources import l7

from mesh.proto import discovery_pb2 as pb
from waypoint.config import compile_table
from waypoint.http.exchange import iterate
from waypoint.http.http1 import Http1Client
from waypoint.http.http2_client import Http2Client
from waypoint.l7.model import RequestHead
from waypoint.upstream.pool import TcpUpstream

REVIEWS_DR = {"host": "reviews", "subsets": [{"name": n, "labels": {"version": n}} for n in ("v1", "v2", "v3")]}


def run(fn: Callable[[], Awaitable[None]], limit: float = 15.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()
    trio.run(main)


def vs(spec: dict, name: str = "reviews") -> Any:
    return l7("VirtualService", name, spec, [fq(h) for h in spec["hosts"]])


def dr(spec: dict = REVIEWS_DR) -> Any:
    return l7("DestinationRule", spec["host"], spec, [fq(spec["host"])])


async def reviews(nursery: trio.Nursery, always: dict[str, int] | None = None) -> tuple[list[Any], list[Any], dict[str, Any]]:
    always = always or {}
    backends = {v: await start_backend(nursery, v, always.get(v, 0)) for v in ("v1", "v2", "v3")}
    wls = [workload(f"reviews-{v}", "reviews", v, b.port) for v, b in backends.items()]
    return [service("reviews", "10.96.0.11")], wls, backends


def route_to(subset: str, **extra: Any) -> dict:
    return {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": subset}}], **extra}]}


def test_http1_routes_weights_keepalive_and_trace_headers() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, backends = await reviews(n)
            spec = {"hosts": ["reviews"], "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
                 "headers": {"response": {"set": {"x-route": "jason"}}}},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                           {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20}]}]}
            async with running_proxy(table(svcs, wls, [vs(spec), dr()])) as (proxy, front, log, _):
                client = Http1Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                head, body = await request(front.port, "/reviews/1", headers=(("end-user", "jason"),
                                                                                ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")),
                                           client=client)
                seen = json.loads(body)
                assert head.status == 200 and seen["backend"] == "v2" and head.header("x-route") == "jason"
                # The trace goes on with the waypoint's own span as the parent of the service's work.
                version, trace_id, span_id, flags = seen["headers"]["traceparent"].split("-")
                assert (version, trace_id, flags) == ("00", "a" * 32, "01") and span_id not in ("b" * 16, "0" * 16)
                assert seen["headers"]["x-b3-traceid"] == "a" * 32 and seen["headers"]["x-b3-spanid"] == span_id
                assert seen["headers"]["x-b3-parentspanid"] == "b" * 16 and seen["headers"]["x-b3-sampled"] == "1"
                assert seen["headers"]["x-request-id"] and seen["headers"]["host"] == "reviews:9080"
                counts: Counter[str] = Counter()
                for _ in range(300):  # all on one keep-alive connection
                    head, body = await request(front.port, "/reviews/1", client=client)
                    counts[json.loads(body)["backend"]] += 1
                await client.aclose()
                assert abs(counts["v1"] / 300 - 0.8) < 0.09 and counts["v1"] + counts["v3"] == 300, counts
                assert proxy.pool.opened <= 4  # endpoints' connections were reused
                entry = await logged(log)
                assert entry["response_code"] == 200 and entry["route_name"] == "route-0" and entry["x_request_id"]
                text = _metrics(proxy)
                assert 'istio_requests_total{' in text and 'reporter="waypoint"' in text
                assert 'destination_version="v2"' in text and 'destination_service="reviews.bookinfo.svc.cluster.local"' in text
                assert 'source_principal="spiffe://cluster.local/ns/bookinfo/sa/sleep"' in text
                assert "istio_request_duration_milliseconds_bucket" in text and "istio_response_bytes_bucket" in text
            n.cancel_scope.cancel()
    run(main)


def test_a_clients_new_connections_share_the_upstream_pool_by_its_address() -> None:
    # A client opening a connection per request (bookinfo's productpage does) reuses the kept-alive
    # upstream connection its earlier ones left, as any HTTP proxy's pool does; the upstream is told the
    # client's address, without the port of whichever connection opened it.
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, _ = await reviews(n)
            async with running_proxy(table(svcs, wls, [vs(route_to("v1")), dr()])) as (proxy, front, _, _n):
                told: list[str] = []

                class Recording(TcpUpstream):
                    async def connect(self, endpoint: Any, *, service: str = "", client: str = "",
                                      traceparent: str = "") -> trio.abc.HalfCloseableStream:
                        told.append(client)
                        return await super().connect(endpoint, service=service, client=client)

                proxy.pool.upstream = Recording()
                for _ in range(20):  # each request on a connection of its own, from a new source port
                    head, body = await request(front.port, "/reviews/1")
                    assert head.status == 200 and json.loads(body)["backend"] == "v1"
                assert proxy.pool.opened == 1 and told == ["127.0.0.1"]
                # a new route table that leaves reviews as it was (a change elsewhere in the mesh, here a
                # service of its own): the pooled connection goes on carrying requests
                other = pb.Service(name="other", namespace="bookinfo", hostname="other.bookinfo.svc.cluster.local",
                                   vips=["10.96.0.99"], ports=[pb.ServicePort(service_port=80, target_port=80)])
                proxy.update(table([*svcs, other], wls, [vs(route_to("v1")), dr()]))
                assert proxy.pool.idle_count() == 1
                head, _body = await request(front.port, "/reviews/1")
                assert head.status == 200 and proxy.pool.opened == 1
                # a new DestinationRule for reviews: nothing opened under the old one carries a request of the new one
                changed = {**REVIEWS_DR, "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "3s"}}}}
                proxy.update(table(svcs, wls, [vs(route_to("v1")), dr(changed)]))
                assert proxy.pool.idle_count() == 0
                for _ in range(3):
                    head, _body = await request(front.port, "/reviews/1")
                    assert head.status == 200
                assert proxy.pool.opened == 2
            n.cancel_scope.cancel()
    run(main)


def _metrics(proxy: Any) -> str:
    from prometheus_client import generate_latest
    return generate_latest(proxy.metrics.registry).decode()


def test_http2_prior_knowledge_client_and_uri_prefix() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, _ = await reviews(n)
            spec = {"hosts": ["reviews"], "http": [
                {"match": [{"uri": {"prefix": "/new"}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}
            async with running_proxy(table(svcs, wls, [vs(spec), dr()])) as (_, front, log, _n):
                c = Http2Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                for path, want in (("/new/x", "v2"), ("/old", "v1"), ("/new", "v2")):
                    await c.send_request(RequestHead("POST", path, "reviews:9080", (("content-length", "5"),), protocol="HTTP/2"),
                                         iterate(b"hello"))
                    head = await c.receive_response()
                    body = b"".join([x async for x in c.response_body()])
                    seen = json.loads(body)
                    assert head.status == 200 and seen["backend"] == want and seen["body"] == "hello"
                await c.aclose()
                assert (await logged(log))["protocol"] == "HTTP/2"
            n.cancel_scope.cancel()
    run(main)


def test_retries_on_5xx_and_connect_failure_reach_the_good_endpoint() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            bad = await start_backend(n, "bad", always=503)
            good = await start_backend(n, "good")
            dead = trio.socket.socket()
            await dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            dead.close()  # nobody listens there: connection refused
            wls = [workload("r-bad", "reviews", "v1", bad.port), workload("r-good", "reviews", "v1", good.port),
                   workload("r-dead", "reviews", "v1", dead_port)]
            spec = route_to("v1", retries={"attempts": 3, "retryOn": "5xx,connect-failure"})
            async with running_proxy(table([service("reviews", "10.96.0.11")], wls, [vs(spec), dr()])) as (_, front, log, _n):
                for _ in range(20):
                    head, body = await request(front.port, "/reviews/1")
                    assert head.status == 200 and json.loads(body)["backend"] == "good"
                await logged(log, 20)
                assert len(bad.seen) > 0 and max(json.loads(x)["attempts"] for x in log) >= 2
            async with running_proxy(table([service("reviews", "10.96.0.11")], wls[:1],
                                           [vs(route_to("v1", retries={"attempts": 2, "retryOn": "5xx"})), dr()])) as (_, front, log, _n):
                head, _ = await request(front.port, "/x")
                assert head.status == 503 and (await logged(log))["attempts"] == 3
            async with running_proxy(table([service("reviews", "10.96.0.11")], wls[2:],
                                           [vs(route_to("v1", retries={"attempts": 0})), dr()])) as (_, front, log, _n):
                head, _ = await request(front.port, "/x")
                assert head.status == 503 and (await logged(log))["response_flags"] == "UF"
            n.cancel_scope.cancel()
    run(main)


def test_timeouts_hanging_endpoint_504_and_per_try_timeout_retries() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, backends = await reviews(n)
            async with running_proxy(table(svcs, wls, [vs(route_to("v1", timeout="0.3s")), dr()])) as (_, front, log, _n):
                t0 = trio.current_time()
                head, body = await request(front.port, "/hang")
                assert head.status == 504 and body == b"upstream request timeout"
                assert 0.25 < trio.current_time() - t0 < 2.0
                assert (await logged(log))["response_flags"] == "UT"
                head, _ = await request(front.port, "/slow/0.05")
                assert head.status == 200
            spec = {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}],
                                                    "retries": {"attempts": 2, "perTryTimeout": "0.2s", "retryOn": "5xx"}}]}
            async with running_proxy(table(svcs, wls, [vs(spec), dr()])) as (_, front, log, _n):
                head, _ = await request(front.port, "/hang")
                assert head.status == 504 and (await logged(log))["attempts"] == 3
            n.cancel_scope.cancel()
    run(main)


def test_fault_abort_and_delay_and_authz_and_jwt_missing() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, backends = await reviews(n)
            spec = {"hosts": ["reviews"], "http": [
                {"match": [{"uri": {"prefix": "/abort"}}], "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
                {"match": [{"uri": {"prefix": "/delay"}}], "fault": {"delay": {"fixedDelay": "200ms", "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}
            viewer = l7("AuthorizationPolicy", "viewer", {"targetRefs": [{"kind": "Service", "name": "reviews"}],
                                                          "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}, [fq("reviews")])
            async with running_proxy(table(svcs, wls, [vs(spec), dr(), viewer])) as (_, front, log, _n):
                head, body = await request(front.port, "/abort")
                assert (head.status, body) == (500, b"fault filter abort")
                assert (await logged(log))["response_flags"] == "FI"
                t0 = trio.current_time()
                head, _ = await request(front.port, "/delay")
                assert head.status == 200 and trio.current_time() - t0 >= 0.19
                assert (await logged(log, 2))["response_flags"] == "DI"
                head, body = await request(front.port, "/ok", method="POST", body=b"x")
                assert (head.status, body) == (403, b"RBAC: access denied")
                assert len(backends["v1"].seen) == 1  # only the delayed GET reached it
            n.cancel_scope.cancel()
    run(main)


def test_mirror_gets_a_shadow_copy_and_never_slows_the_request() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, backends = await reviews(n)
            spec = route_to("v1", mirror={"host": "reviews", "subset": "v3"}, mirrorPercentage={"value": 100.0})
            async with running_proxy(table(svcs, wls, [vs(spec), dr()])) as (_, front, _log, _n):
                head, _ = await request(front.port, "/m", method="POST", body=b"payload")
                assert head.status == 200
                with trio.fail_after(2):
                    while not backends["v3"].seen:
                        await trio.sleep(0.01)
                copy = backends["v3"].seen[0]
                assert copy["headers"]["host"] == "reviews-shadow:9080" and copy["body"] == "payload"
            backends["v3"].hang = True  # the mirror now never answers: requests do not wait for it
            async with running_proxy(table(svcs, wls, [vs(spec), dr()])) as (_, front, _log, _n):
                t0 = trio.current_time()
                for _ in range(5):
                    head, _ = await request(front.port, "/m")
                    assert head.status == 200
                assert trio.current_time() - t0 < 1.0
                assert len(backends["v3"].seen) >= 2
            n.cancel_scope.cancel()
    run(main)


def test_malformed_oversized_and_slow_clients() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, _ = await reviews(n)
            async with running_proxy(table(svcs, wls, [dr()])) as (_, front, _log, _n):
                out = await raw(front.port, b"GET /x HTTP/1.1\r\nHost: reviews\r\nbad header line\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 400 ")
                out = await raw(front.port, b"GET /x HTTP/1.1\r\nHost: reviews\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 431 ")
                t0 = trio.current_time()
                out = await raw(front.port, b"GET /x HTTP/1.1\r\nHost: rev", wait=3)
                assert out.startswith(b"HTTP/1.1 408 ") and trio.current_time() - t0 < 2.5
                # a good request still works afterwards
                head, _ = await request(front.port, "/fine")
                assert head.status == 200
            n.cancel_scope.cancel()
    run(main)


def test_upstream_reset_mid_response_reaches_the_client() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, _ = await reviews(n)
            async with running_proxy(table(svcs, wls, [vs(route_to("v1")), dr()])) as (_, front, log, _n):
                out = await raw(front.port, b"GET /reset HTTP/1.1\r\nHost: reviews\r\n\r\n")
                assert out.startswith(b"HTTP/1.1 200 ")
                assert len(out.split(b"\r\n\r\n", 1)[1]) < 100000  # truncated, then closed
                with trio.fail_after(2):
                    while not log:
                        await trio.sleep(0.01)
                assert "UC" in json.loads(log[-1])["response_flags"]
                # over HTTP/2 the client sees its stream reset
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "GET"), (":path", "/reset"), (":authority", "reviews"),
                                        (":scheme", "http")], end_stream=True)
                stream = await trio.open_tcp_stream("127.0.0.1", front.port)
                await stream.send_all(conn.data_to_send())
                reset = False
                with trio.fail_after(3):
                    while not reset:
                        data = await stream.receive_some(65536)
                        assert data
                        for ev in conn.receive_data(data):
                            reset = reset or isinstance(ev, h2.events.StreamReset)
                        await stream.send_all(conn.data_to_send())
                await stream.aclose()
            n.cancel_scope.cancel()
    run(main)


def test_outlier_detection_ejects_the_failing_endpoint() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            bad = await start_backend(n, "bad", always=500)
            good = await start_backend(n, "good")
            wls = [workload("r-bad", "reviews", "v1", bad.port), workload("r-good", "reviews", "v1", good.port)]
            rule = l7("DestinationRule", "reviews", {"host": "reviews", "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s",
                                     "maxEjectionPercent": 100}}}, [fq("reviews")])
            no_retry = vs({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], "retries": {"attempts": 0}}]})
            async with running_proxy(table([service("reviews", "10.96.0.11")], wls, [rule, no_retry])) as (_, front, _log, _n):
                codes = [(await request(front.port, "/"))[0].status for _ in range(20)]
                assert codes.count(500) == 2 and codes[-10:] == [200] * 10, codes
            n.cancel_scope.cancel()
    run(main)


def test_connection_pool_overflow_is_503_uo() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, _ = await reviews(n)
            rule = l7("DestinationRule", "reviews", {"host": "reviews", "trafficPolicy": {"connectionPool": {
                "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}}, [fq("reviews")])
            async with running_proxy(table(svcs, wls, [rule])) as (_, front, log, _n):
                results: list[int] = []

                async def one() -> None:
                    results.append((await request(front.port, "/slow/0.3"))[0].status)
                async with trio.open_nursery() as inner:
                    for _ in range(4):
                        inner.start_soon(one)
                assert sorted(results) == [200, 200, 503, 503], results
                await logged(log, 4)
                assert sum("UO" in json.loads(x)["response_flags"] for x in log) == 2
            n.cancel_scope.cancel()
    run(main)


def test_config_change_under_load_loses_no_request() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, backends = await reviews(n)
            tables = [table(svcs, wls, [vs(route_to(v)), dr()], version=i) for i, v in enumerate(("v1", "v2", "v3"))]
            async with running_proxy(tables[0]) as (proxy, front, log, _n):
                statuses: Counter[int] = Counter()
                stop = trio.Event()

                async def load() -> None:
                    client = Http1Client(await trio.open_tcp_stream("127.0.0.1", front.port))
                    while not stop.is_set():
                        statuses[(await request(front.port, "/slow/0.01", client=client))[0].status] += 1
                    await client.aclose()

                async with trio.open_nursery() as inner:
                    for _ in range(8):
                        inner.start_soon(load)
                    for i in range(30):
                        proxy.update(tables[i % 3])
                        await trio.sleep(0.02)
                    stop.set()
                assert set(statuses) == {200} and sum(statuses.values()) > 50, statuses
                assert all(backends[v].seen for v in ("v1", "v2", "v3"))
            n.cancel_scope.cancel()
    run(main)


def test_jwt_through_the_proxy_with_jwks_uri() -> None:
    import time

    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1")
    jwks_body = json.dumps({"keys": [jwk]}).encode()
    iss = "testing@secure.istio.io"
    good = pyjwt.encode({"iss": iss, "sub": "alice", "exp": int(time.time()) + 300}, key, algorithm="RS256", headers={"kid": "k1"})

    async def serve_jwks(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(jwks_body) + jwks_body)
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as n:
            svcs, wls, backends = await reviews(n)
            listeners = await n.start(partial(trio.serve_tcp, serve_jwks, 0, host="127.0.0.1"))
            uri = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/jwks.json"
            ra = l7("RequestAuthentication", "jwt", {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}],
                                                     "jwtRules": [{"issuer": iss, "jwksUri": uri}]})
            require = l7("AuthorizationPolicy", "require-jwt", {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}],
                                                                "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}],
                                                                           "to": [{"operation": {"paths": ["/private*"]}}]},
                                                                          {"to": [{"operation": {"notPaths": ["/private*"]}}]}]})
            # This key set is served over plain http, which the waypoint refuses unless allowed.
            compiled = compile_table(WAYPOINT, wls, svcs, [vs(route_to("v1")), dr(), ra, require], allow_http_jwks=True)
            assert not compiled.errors, compiled.errors
            async with running_proxy(compiled.table) as (proxy, front, log, _n):
                with trio.fail_after(5):  # fetched in the background; requests never wait for it
                    while proxy.jwks.get(uri) is None:
                        await trio.sleep(0.01)
                head, body = await request(front.port, "/private", headers=(("authorization", f"Bearer {good}"),))
                assert head.status == 200 and "authorization" not in json.loads(body)["headers"]
                assert (await logged(log))["request_principal"] == f"{iss}/alice"
                head, _ = await request(front.port, "/private", headers=(("authorization", "Bearer " + good[:-4] + "AAAA"),))
                assert head.status == 401
                head, body = await request(front.port, "/private")
                assert (head.status, body) == (403, b"RBAC: access denied")
                head, _ = await request(front.port, "/public")
                assert head.status == 200
            n.cancel_scope.cancel()
    run(main)


def test_non_http_traffic_passes_as_l4() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    async def main() -> None:
        async with trio.open_nursery() as n:
            listeners = await n.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            svcs = [service("db", "10.96.0.20")]
            wls = [workload("db-0", "db", "v1", port)]
            async with running_proxy(table(svcs, wls, []), destination="10.96.0.20:9080") as (_, front, _log, _n):
                stream = await trio.open_tcp_stream("127.0.0.1", front.port)
                await stream.send_all(b"\x16\x03\x01binary-hello")
                got = b""
                while len(got) < 15:
                    got += await stream.receive_some(100)
                assert got == b"\x16\x03\x01binary-hello"
                await stream.aclose()
            n.cancel_scope.cancel()
    run(main)
