"""A new route table retires only the pooled upstream connections it changed (`waypoint.config.pool_changes`,
`ConnectionPool.retire`): a waypoint gets every workload and service of the mesh, and retiring all of its
connections on each update would leave its pool empty in a mesh that changes all the time."""

from __future__ import annotations

import dataclasses

import trio
import trio.testing
from waypoint_resources import REVIEWS_DR, bookinfo, fq, l7, service, workload

from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.proto import discovery_pb2 as pb
from waypoint.config import RouteTable, compile_table, pool_changes
from waypoint.l7.model import Endpoint
from waypoint.upstream.pool import ConnectionPool

WAYPOINT = "bookinfo/waypoint"
REVIEWS_V1 = "10.244.1.11:9080"
RATINGS_V1 = "10.244.2.14:9080"


def build(workloads: list[pb.Workload], services: list[pb.Service], configs: list[pb.L7Config] | None = None,
          ingress: bool = False) -> RouteTable:
    result = compile_table(WAYPOINT, workloads, services,
                           configs if configs is not None else [l7("DestinationRule", "reviews", REVIEWS_DR, [fq("reviews")])])
    assert not result.errors, result.errors
    return dataclasses.replace(result.table, ingress=True) if ingress else result.table


def test_what_a_connection_rests_on_retires_it_and_nothing_else_does() -> None:
    workloads, services = bookinfo()
    before = build(workloads, services)
    assert not pool_changes(before, build(workloads, services))(REVIEWS_V1, fq("reviews"))  # recompiled, equal

    # elsewhere in the mesh: a new pod and a new service; a pod of the same service leaving
    more = [*workloads, workload("extra-v1", "10.244.3.9", "extra")]
    changed = pool_changes(before, build(more, [*services, service("extra", "10.96.0.30")]))
    assert not changed(REVIEWS_V1, fq("reviews")) and not changed(RATINGS_V1, fq("ratings"))
    fewer = [w for w in workloads if w.name != "reviews-v2"]
    assert not pool_changes(before, build(fewer, services))(REVIEWS_V1, fq("reviews"))
    # a workload's labels or health are the load balancer's business, not the connection's
    relabelled = [pb.Workload(**{**_fields(w), "labels": {**w.labels, "team": "a"}, "status": pb.UNHEALTHY})
                  if w.name == "reviews-v1" else w for w in workloads]
    assert not pool_changes(before, build(relabelled, services))(REVIEWS_V1, fq("reviews"))

    # the endpoint itself: gone, another identity, no longer in the mesh
    gone = [w for w in workloads if w.name != "reviews-v1"]
    assert pool_changes(before, build(gone, services))(REVIEWS_V1, fq("reviews"))
    other_sa = [pb.Workload(**{**_fields(w), "service_account": "impostor"}) if w.name == "reviews-v1" else w
                for w in workloads]
    assert pool_changes(before, build(other_sa, services))(REVIEWS_V1, fq("reviews"))
    plain = [pb.Workload(**{**_fields(w), "tunnel_protocol": pb.NONE}) if w.name == "reviews-v1" else w
             for w in workloads]
    changed = pool_changes(before, build(plain, services))
    assert changed(REVIEWS_V1, fq("reviews")) and not changed(RATINGS_V1, fq("ratings"))

    # the service: its DestinationRule, its waypoint; only its own connections
    dr = {**REVIEWS_DR, "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "3s"}}}}
    changed = pool_changes(before, build(workloads, services, [l7("DestinationRule", "reviews", dr, [fq("reviews")])]))
    assert changed(REVIEWS_V1, fq("reviews")) and not changed(RATINGS_V1, fq("ratings"))
    assert not changed(REVIEWS_V1, "")  # (a workload's own address: no service, no DestinationRule)
    unbound = [service(s.name, s.vips[0], waypoint="") if s.name == "reviews" else s for s in services]
    changed = pool_changes(before, build(workloads, unbound))
    assert changed(REVIEWS_V1, fq("reviews")) and not changed(RATINGS_V1, fq("ratings"))


def test_an_ingress_gateway_retires_a_service_whose_waypoint_pod_changed() -> None:
    # A gateway sends a service's requests through the service's waypoint (its first healthy pod): the
    # connection goes to that pod, so another pod means another connection.  A waypoint's own table does
    # not hop, and keeps its connections.
    workloads, services = bookinfo()

    def waypoint_pod(ip: str) -> pb.Workload:
        w = workload(f"waypoint-{ip}", ip, "waypoint", sa="waypoint")
        w.labels[GATEWAY_NAME_LABEL] = "waypoint"
        w.status = pb.HEALTHY
        return w

    one, two = waypoint_pod("10.244.1.50"), waypoint_pod("10.244.1.40")
    for ingress in (True, False):
        before = build([*workloads, one], services, ingress=ingress)
        after = build([*workloads, one, two], services, ingress=ingress)  # 10.244.1.40 sorts first now
        assert pool_changes(before, after)(REVIEWS_V1, fq("reviews")) is ingress
        same = build([*workloads, one, waypoint_pod("10.244.1.60")], services, ingress=ingress)
        assert not pool_changes(before, same)(REVIEWS_V1, fq("reviews"))


def _fields(w: pb.Workload) -> dict[str, object]:
    return {f.name: getattr(w, f.name) for f, _ in w.ListFields()}


def test_retiring_some_keys_keeps_the_others_and_closes_theirs_when_given_back() -> None:
    class Opening:
        async def connect(self, endpoint: Endpoint, **_: str) -> trio.abc.HalfCloseableStream:
            return trio.testing.memory_stream_pair()[0]  # type: ignore[return-value]

    async def main() -> None:
        pool = ConnectionPool(upstream=Opening())  # type: ignore[arg-type]
        reviews, ratings = Endpoint("10.244.1.11", 9080), Endpoint("10.244.2.14", 9080)
        kept, _ = await pool.acquire(ratings, "HTTP/1.1", 1.0, fq("ratings"), client="10.244.1.10")
        await pool.release(ratings, "HTTP/1.1", kept, client="10.244.1.10", service=fq("ratings"))
        idle, _ = await pool.acquire(reviews, "HTTP/1.1", 1.0, fq("reviews"), client="10.244.1.10")
        await pool.release(reviews, "HTTP/1.1", idle, client="10.244.1.10", service=fq("reviews"))
        in_use, reused = await pool.acquire(reviews, "HTTP/1.1", 1.0, fq("reviews"), client="10.244.1.10")
        assert reused and in_use is idle
        spare, _ = await pool.acquire(reviews, "HTTP/1.1", 1.0, fq("reviews"), client="10.244.1.10")
        await pool.release(reviews, "HTTP/1.1", spare, client="10.244.1.10", service=fq("reviews"))
        # a connection opened for one service is not handed to a request for another on the same endpoint
        other, reused = await pool.acquire(reviews, "HTTP/1.1", 1.0, fq("reviews-alias"), client="10.244.1.10")
        assert not reused and other not in (in_use, spare)
        assert pool.opened == 4

        named: list[tuple[str, str]] = []

        def changed(endpoint: str, service: str) -> bool:
            named.append((endpoint, service))
            return service == fq("reviews")

        pool.retire(changed)
        assert (REVIEWS_V1, fq("reviews")) in named and (RATINGS_V1, fq("ratings")) in named
        assert pool.idle_count() == 1  # ratings' connection stays, reviews' idle one is retired
        again, reused = await pool.acquire(ratings, "HTTP/1.1", 1.0, fq("ratings"), client="10.244.1.10")
        assert reused and again is kept
        await pool.release(reviews, "HTTP/1.1", in_use, client="10.244.1.10", service=fq("reviews"))
        assert pool.idle_count() == 0  # in use when its key was retired: closed when given back
        await pool.release(reviews, "HTTP/1.1", other, client="10.244.1.10", service=fq("reviews-alias"))
        assert pool.idle_count() == 1  # a key the table did not change
        await pool.expire()  # `run` closes what `retire` set aside
        assert (await pool.acquire(reviews, "HTTP/1.1", 1.0, fq("reviews"), client="10.244.1.10"))[1] is False
        await pool.aclose()

    trio.run(main)


def test_a_connection_whose_key_was_retired_while_it_opened_carries_one_request() -> None:
    # The table changed while the tunnel was being dialled: what it rests on was decided under the old one.
    class Slow:
        def __init__(self) -> None:
            self.go = trio.Event()

        async def connect(self, endpoint: Endpoint, **_: str) -> trio.abc.HalfCloseableStream:
            await self.go.wait()
            return trio.testing.memory_stream_pair()[0]  # type: ignore[return-value]

    async def main() -> None:
        upstream = Slow()
        pool = ConnectionPool(upstream=upstream)  # type: ignore[arg-type]
        reviews = Endpoint("10.244.1.11", 9080)
        got: dict[str, object] = {}

        async def acquire(host: str) -> None:
            got[host], _ = await pool.acquire(reviews, "HTTP/1.1", 5.0, host, client="10.244.1.10")

        async with trio.open_nursery() as n:
            n.start_soon(acquire, fq("reviews"))
            n.start_soon(acquire, fq("reviews-alias"))
            await trio.testing.wait_all_tasks_blocked()
            pool.retire(lambda endpoint, host: host == fq("reviews"))  # named: its dial goes stale
            upstream.go.set()
        for host in (fq("reviews"), fq("reviews-alias")):
            await pool.release(reviews, "HTTP/1.1", got[host], client="10.244.1.10", service=host)  # type: ignore[arg-type]
        assert pool.idle_count() == 1
        assert (await pool.acquire(reviews, "HTTP/1.1", 1.0, fq("reviews-alias"), client="10.244.1.10"))[1] is True
        await pool.aclose()

    trio.run(main)
