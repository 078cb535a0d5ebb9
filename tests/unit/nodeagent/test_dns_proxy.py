"""The DNS proxy's decisions and answers, on the state the agent gets (bookinfo and ServiceEntries through
the control plane's translation), with a real upstream resolver on a loopback socket."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from mesh.identity import SpiffeId
from nodeagent.dns.message import (
    FLAG_QR,
    QType,
    Rcode,
    answer,
    build_query,
    parse_query,
    parse_response,
    refusal,
)
from nodeagent.dns.metrics import DnsMetrics
from nodeagent.dns.server import DnsProxy
from nodeagent.dns.table import NameTable
from nodeagent.dns.upstream import (
    Resolver,
    Upstream,
    UpstreamError,
    parse_upstreams,
    read_framed,
    system_upstreams,
)
from nodeagent.pods.source import PodRef
from nodeagent.state import MeshState


def entry(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


ENTRIES = [
    entry("ext", "bookinfo", hosts=["api.example.com"], ports=[{"number": 443, "name": "tls"}], resolution="DNS"),
    entry("wild", "bookinfo", hosts=["*.example.org"], addresses=["240.241.0.1"], ports=[{"number": 80, "name": "http"}],
          resolution="STATIC", endpoints=[{"address": "192.0.2.1"}]),
    entry("deeper", "bookinfo", hosts=["*.eu.example.org"], addresses=["240.241.0.2"],
          ports=[{"number": 80, "name": "http"}], resolution="STATIC", endpoints=[{"address": "192.0.2.2"}]),
    entry("private", "bookinfo", hosts=["private.example.com"], addresses=["240.241.0.3"], exportTo=["."],
          ports=[{"number": 80, "name": "http"}], resolution="STATIC", endpoints=[{"address": "192.0.2.3"}]),
    entry("passthrough", "bookinfo", hosts=["pass.example.com"], ports=[{"number": 80, "name": "http"}],
          resolution="NONE"),
]


@pytest.fixture
def state(mesh_state: Callable[..., MeshState]) -> MeshState:
    return mesh_state(ENTRIES)


def vip_of(state: MeshState, host: str) -> str:
    return next(s.vips[0] for s in state.services() if s.hostname == host)


def test_service_names_in_all_their_forms(state: MeshState) -> None:
    table = NameTable.of(state.services())
    ip = vip_of(state, "reviews.bookinfo.svc.cluster.local")
    for name in ("reviews.bookinfo.svc.cluster.local", "reviews.bookinfo.svc", "reviews.bookinfo",
                 "REVIEWS.bookinfo.svc.cluster.local.", "reviews.bookinfo.legacy.svc.cluster.local"):
        found = table.lookup(name, "legacy")
        assert found is not None and found.addresses == (ip,), name
    found = table.lookup("reviews", "bookinfo")  # a bare name: the pod's own namespace
    assert found is not None and found.addresses == (ip,)
    assert table.lookup("reviews", "legacy") is None  # no reviews in legacy: forwarded
    assert table.lookup("reviews.legacy", "legacy") is None


def test_entry_hosts_wildcards_and_export(state: MeshState) -> None:
    table = NameTable.of(state.services())
    api = table.lookup("api.example.com", "bookinfo")
    assert api is not None and api.addresses == (vip_of(state, "api.example.com"),)
    assert api.addresses[0].startswith("240.240.")
    one = table.lookup("a.b.example.org", "bookinfo")
    assert one is not None and one.addresses == ("240.241.0.1",)
    deeper = table.lookup("x.eu.example.org", "bookinfo")  # the most specific wildcard
    assert deeper is not None and deeper.addresses == ("240.241.0.2",)
    assert table.lookup("example.org", "bookinfo") is None  # a wildcard covers names under it only
    assert table.lookup("private.example.com", "bookinfo") is not None
    assert table.lookup("private.example.com", "legacy") is None  # exportTo ".": not seen from legacy
    assert table.lookup("pass.example.com", "bookinfo") is None  # no address: the upstream knows the real ones


class FakeUpstream:
    """A real DNS server on a loopback socket (UDP and TCP): A records from `records`, NXDOMAIN otherwise."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.seen: list[tuple[str, str]] = []
        self.udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    async def start(self, nursery: trio.Nursery) -> tuple[str, int]:
        port = await self._bind_one_port_for_both()
        self.tcp.listen(8)
        nursery.start_soon(self._udp)
        nursery.start_soon(trio.serve_listeners, self._tcp, [trio.SocketListener(self.tcp)])
        return "127.0.0.1", port

    async def _bind_one_port_for_both(self) -> int:
        """The kernel's free UDP port may be taken for TCP by another test's socket: try fresh ports until one is free for both."""
        for _ in range(50):
            await self.udp.bind(("127.0.0.1", 0))
            port: int = self.udp.getsockname()[1]
            try:
                await self.tcp.bind(("127.0.0.1", port))
                return port
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
            self.udp.close()
            self.udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raise RuntimeError("no loopback port was free for both UDP and TCP in 50 tries")

    def reply(self, data: bytes, protocol: str) -> bytes:
        query = parse_query(data)
        self.seen.append((query.name, protocol))
        ip = self.records.get(query.name)
        return answer(query, [ip], ttl=60) if ip else refusal(query, Rcode.NXDOMAIN)

    async def _udp(self) -> None:
        while True:
            data, peer = await self.udp.recvfrom(4096)
            await self.udp.sendto(self.reply(data, "udp"), peer)

    async def _tcp(self, stream: trio.SocketStream) -> None:
        data = await read_framed(stream)
        reply = self.reply(data, "tcp")
        await stream.send_all(struct.pack("!H", len(reply)) + reply)


POD = PodRef(uid="bookinfo/productpage-v1", namespace="bookinfo", name="productpage-v1", ip="10.244.1.3",
             identity=SpiffeId("cluster.local", "bookinfo", "bookinfo-productpage"), netns="/run/netns/x")


def run_with_upstream(state: MeshState, body: Callable[[DnsProxy, FakeUpstream], Any], *,
                      records: dict[str, str] | None = None, dead: bool = False) -> tuple[Any, CollectorRegistry]:
    registry = CollectorRegistry()
    result: list[Any] = []

    async def main() -> None:
        fake = FakeUpstream(records or {})
        async with trio.open_nursery() as nursery:
            address = await fake.start(nursery)
            if dead:  # a port nothing answers on
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", 0))
                    address = s.getsockname()
            proxy = DnsProxy(state, Upstream([address], timeout=0.5), DnsMetrics(registry))
            result.append(await body(proxy, fake))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0], registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return value or 0.0


def test_known_names_are_answered_and_the_rest_forwarded(state: MeshState) -> None:
    async def body(proxy: DnsProxy, fake: FakeUpstream) -> list[Any]:
        ours = parse_response(await proxy.handle(build_query(1, "details"), "udp", POD) or b"")
        theirs = parse_response(await proxy.handle(build_query(2, "www.upstream.test"), "udp", POD) or b"")
        over_tcp = parse_response(await proxy.handle(build_query(3, "www.upstream.test"), "tcp", POD) or b"")
        unknown = parse_response(await proxy.handle(build_query(4, "nowhere.test"), "udp", POD) or b"")
        srv = parse_response(await proxy.handle(build_query(5, "details", QType.SRV), "udp", POD) or b"")
        return [ours, theirs, over_tcp, unknown, srv, list(fake.seen)]

    (ours, theirs, over_tcp, unknown, srv, seen), registry = run_with_upstream(
        state, body, records={"www.upstream.test": "192.0.2.80"})
    assert ours.addresses == (vip_of(state, "details.bookinfo.svc.cluster.local"),) and ours.id == 1
    assert theirs.addresses == ("192.0.2.80",) and over_tcp.addresses == ("192.0.2.80",)
    assert unknown.rcode == Rcode.NXDOMAIN and srv.rcode == Rcode.NXDOMAIN  # not A/AAAA: the upstream's to say
    assert seen == [("www.upstream.test", "udp"), ("www.upstream.test", "tcp"), ("nowhere.test", "udp"),
                    ("details", "udp")]
    labels = {"request_query_type": "a", "request_protocol": "udp", "source_canonical_service": "productpage",
              "source_canonical_revision": "v1"}
    assert sample(registry, "istio_dns_requests_total", **labels) == 3
    assert sample(registry, "istio_dns_upstream_requests_total", **labels) == 2
    assert sample(registry, "istio_dns_upstream_failures_total", **labels) == 0


def test_an_upstream_that_does_not_answer_is_servfail_and_counted(state: MeshState) -> None:
    async def body(proxy: DnsProxy, fake: FakeUpstream) -> Any:
        return parse_response(await proxy.handle(build_query(7, "slow.test"), "udp", POD) or b"")

    reply, registry = run_with_upstream(state, body, dead=True)
    assert reply.rcode == Rcode.SERVFAIL and reply.id == 7
    assert sample(registry, "istio_dns_upstream_failures_total", request_query_type="a", request_protocol="udp",
                  source_canonical_service="productpage", source_canonical_revision="v1") == 1


def test_bad_bytes_get_formerr_or_nothing_and_a_log_line(state: MeshState, caplog: pytest.LogCaptureFixture) -> None:
    async def body(proxy: DnsProxy, fake: FakeUpstream) -> list[bytes | None]:
        return [await proxy.handle(b"\x12\x34\x01\x00\x00\x05" + b"\0" * 6 + b"junk", "udp", POD, "10.244.1.3:5000"),
                await proxy.handle(b"\x12", "tcp", POD),
                await proxy.handle(b"\x12\x34\x81\x80" + b"\0" * 8, "udp", POD)]

    (formerr, nothing, to_a_response), _ = run_with_upstream(state, body)
    assert formerr is not None and formerr[:2] == b"\x12\x34" and formerr[3] & 0xF == Rcode.FORMERR
    assert formerr[2] & (FLAG_QR >> 8)
    assert nothing is None and to_a_response is None
    lines = [r.getMessage() for r in caplog.records if "dns_bad_query" in r.getMessage()]
    assert len(lines) == 3 and "bookinfo/productpage-v1" in lines[0] and "exactly one question" in lines[0]


def test_the_table_follows_the_state(state: MeshState, mesh_state: Callable[..., MeshState]) -> None:
    async def body(proxy: DnsProxy, fake: FakeUpstream) -> list[Any]:
        before = parse_response(await proxy.handle(build_query(1, "new.example.com"), "udp", POD) or b"")
        fresh = mesh_state([*ENTRIES, entry("new", "bookinfo", hosts=["new.example.com"], addresses=["240.241.9.9"],
                                            ports=[{"number": 80, "name": "http"}], resolution="STATIC",
                                            endpoints=[{"address": "192.0.2.9"}])])
        state.apply("service", {f"{s.namespace}/{s.hostname}": s for s in fresh.services()}, ())
        after = parse_response(await proxy.handle(build_query(2, "new.example.com"), "udp", POD) or b"")
        return [before, after]

    (before, after), _ = run_with_upstream(state, body)
    assert before.rcode == Rcode.NXDOMAIN and after.addresses == ("240.241.9.9",)


def test_the_resolver_asks_the_upstream_and_keeps_answers(state: MeshState) -> None:
    async def body(proxy: DnsProxy, fake: FakeUpstream) -> list[Any]:
        resolver = Resolver(proxy.upstream)
        first = await resolver.resolve("db.partner.test")
        second = await resolver.resolve("DB.partner.test.")
        with pytest.raises(UpstreamError, match="missing.test does not resolve .*NXDOMAIN"):
            await resolver.resolve("missing.test")
        return [first, second, list(fake.seen)]

    (first, second, seen), _ = run_with_upstream(state, body, records={"db.partner.test": "192.0.2.44"})
    assert first == second == ("192.0.2.44",)
    assert seen == [("db.partner.test", "udp"), ("missing.test", "udp")]


def test_upstream_settings(tmp_path: Any) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search a.svc.cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n")
    assert system_upstreams(conf) == (("10.96.0.10", 53), ("10.96.0.11", 53))
    assert system_upstreams(tmp_path / "absent") == ()
    assert parse_upstreams("10.0.0.2:5353, 10.0.0.3") == (("10.0.0.2", 5353), ("10.0.0.3", 53))
    with pytest.raises(Exception, match="must be an IPv4 address"):
        parse_upstreams("dns.example")

    async def no_upstream() -> None:
        with pytest.raises(UpstreamError, match="no upstream resolver is configured"):
            await Upstream(()).forward(build_query(1, "x"))

    trio.run(no_upstream)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=120),
                      st.builds(lambda qid, name, qtype, tail: build_query(qid, name, qtype) + tail,
                                st.integers(0, 65535), st.sampled_from(["details", "api.example.com", "a.b.example.org",
                                                                        "x.test", "reviews.bookinfo"]),
                                st.integers(0, 300), st.binary(max_size=8))))
def test_any_bytes_get_an_answer_or_none_never_an_exception(state: MeshState, data: bytes) -> None:
    proxy = DnsProxy(state, Upstream(()), DnsMetrics(CollectorRegistry()))  # no upstream: SERVFAIL at once

    async def main() -> bytes | None:
        return await proxy.handle(data, "udp", POD)

    reply = trio.run(main)
    if reply is not None:
        assert reply[:2] == data[:2] and reply[2] & (FLAG_QR >> 8)
