"""What a client writes in forwarding and Envoy-internal headers is not what leaves the waypoint.

End to end over real HBONE (a CA, the source's SVID, the waypoint's inbound server, TLS 1.3):

- `x-forwarded-client-cert` is set as Envoy's SANITIZE_SET with By, Hash and URI: the waypoint's
  identity, the SHA-256 of the client's leaf certificate (DER, hex) and the client's identity;
- `x-forwarded-proto` is the waypoint's (`http`), not the client's;
- Envoy's internal `x-envoy-*` request headers written by the client are removed before routing, so
  nothing downstream of the waypoint (nor the waypoint) acts on them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from mesh.hbone.headers import request_headers
from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.tls import client_context
from tests.unit.waypoint.waypoint_harness import start_backend
from tests.unit.waypoint.waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID, running_ca
from tests.unit.waypoint.waypoint_resources import service, workload
from waypoint.config import compile_table
from waypoint.http.exchange import iterate
from waypoint.http.http1 import Http1Client
from waypoint.inbound import InboundServer
from waypoint.l7.forwarding import forwarding_headers
from waypoint.l7.model import RequestHead
from waypoint.proxy import WaypointProxy
from waypoint.upstream.connect import HboneUpstream

pytestmark = pytest.mark.timeout(60)

SPOOFED = (
    ("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/bookinfo/sa/waypoint;Hash=00;"
                                "URI=spiffe://cluster.local/ns/istio-system/sa/admin"),
    ("x-forwarded-proto", "https"),
    ("x-envoy-original-path", "/admin"),
    ("x-envoy-expected-rq-timeout-ms", "1"),
    ("x-envoy-retry-on", "5xx"),
    ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("x-envoy-max-retries", "100"),
    ("x-envoy-internal", "true"),
    ("x-kept", "yes"),
)


def run(fn: Callable[[], Awaitable[None]], limit: float = 30.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await fn()
    trio.run(main)


def test_the_waypoint_sanitizes_forwarding_and_envoy_headers(tmp_path: Path) -> None:
    async def main() -> None:
        with running_ca(tmp_path) as ca:
            certs, ca_client = ca.secret_manager(WAYPOINT_ID)
            svid = ca.mint(SLEEP_ID)
            leaf_hash = hashlib.sha256(svid.leaf.der).hexdigest()
            with ca_client:
                async with trio.open_nursery() as n:
                    await n.start(certs.run)
                    backend = await start_backend(n, "v1")
                    reviews = workload("reviews-v1", "127.0.0.1", "reviews", target_port=backend.port)
                    reviews.tunnel_protocol = pb.NONE  # the backend is plain TCP
                    table = compile_table("bookinfo/waypoint", [reviews], [service("reviews", "10.96.0.11")], []).table
                    out = HbonePool(tcp_connect, certs.client_context)
                    await n.start(out.run)
                    proxy = WaypointProxy(HboneUpstream(out, WAYPOINT_ID), table, rng=random.Random(1),
                                          access_log=lambda _line: None, identity=str(WAYPOINT_ID))
                    inbound = InboundServer(proxy, certs, WAYPOINT_ID)
                    port = await n.start(inbound.serve, "127.0.0.1", 0)
                    ctx = client_context(svid)
                    sleep = HbonePool(tcp_connect, lambda _source: ctx, connect_timeout=5)
                    await n.start(sleep.run)
                    key = PoolKey(source=SLEEP_ID, destination=WAYPOINT_ID, address=("127.0.0.1", port))
                    tunnel = await sleep.open_tunnel(key, "10.96.0.11:9080", request_headers(forwarded_for="10.244.1.7:4000"))
                    client = Http1Client(tunnel)  # type: ignore[arg-type]
                    await client.send_request(RequestHead("GET", "/reviews/1", "reviews:9080", SPOOFED), iterate(b""))
                    head = await client.receive_response()
                    body = b"".join([chunk async for chunk in client.response_body()])
                    await client.aclose()
                    assert head.status == 200
                    seen = json.loads(body)["headers"]
                    assert seen["x-forwarded-client-cert"] == f"By={WAYPOINT_ID.uri};Hash={leaf_hash};URI={SLEEP_ID.uri}"
                    assert seen["x-forwarded-proto"] == "http"
                    assert not [h for h in seen if h.startswith("x-envoy-")], seen
                    assert seen["x-kept"] == "yes" and backend.seen[0]["path"] == "/reviews/1"
                    n.cancel_scope.cancel()
    run(main)


def test_forwarding_headers_without_a_certificate_hash_or_identity() -> None:
    headers = (("X-Envoy-Retry-On", "5xx"), ("x-forwarded-proto", "https"), ("accept", "*/*"))
    out = dict(forwarding_headers(headers, source_ip="10.0.0.7", peer_identity="spiffe://td/ns/n/sa/s"))
    assert out == {"accept": "*/*", "x-forwarded-for": "10.0.0.7", "x-forwarded-proto": "http",
                   "x-forwarded-client-cert": "URI=spiffe://td/ns/n/sa/s"}
    out = dict(forwarding_headers(headers, source_ip="", peer_identity="", scheme="https"))
    assert out == {"accept": "*/*", "x-forwarded-proto": "https"}
