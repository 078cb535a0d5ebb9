"""Telemetry `accessLogging` on a waypoint: resolved as tracing is (root namespace, then the waypoint's own
namespace, then a Telemetry naming its Gateway), and a waypoint whose log is off writes no line per request
while still counting it in its metrics."""

from __future__ import annotations

from typing import Any

import trio
from waypoint_harness import request, running_proxy, service, start_backend, table, workload
from waypoint_resources import l7

from mesh.proto import discovery_pb2 as pb
from waypoint.config import AccessLogging, compile_table

WAYPOINT = "bookinfo/waypoint"


def telemetry(name: str, namespace: str, spec: dict[str, Any]) -> pb.L7Config:
    msg = l7("DestinationRule", name, spec, ns=namespace)
    msg.kind = pb.TELEMETRY
    msg.api_version = "telemetry.istio.io/v1"
    return msg


OFF = {"accessLogging": [{"disabled": True}]}
ON = {"accessLogging": [{"providers": [{"name": "envoy"}]}]}
GATEWAY = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}


def resolved(*configs: pb.L7Config) -> AccessLogging:
    result = compile_table(WAYPOINT, [workload("reviews-v1", "reviews", "v1", 9080)],
                           [service("reviews", "10.96.0.11")], list(configs))
    assert not result.errors, result.errors
    return result.table.access_log


def test_the_most_specific_telemetry_decides() -> None:
    assert resolved() == AccessLogging(True, ())
    assert resolved(telemetry("mesh-default", "istio-system", OFF)) == AccessLogging(False, ("istio-system/mesh-default",))
    # the namespace's own turns it on again, a Telemetry naming the Gateway off once more
    assert resolved(telemetry("mesh-default", "istio-system", OFF),
                    telemetry("logs", "bookinfo", ON)) == AccessLogging(True, ("bookinfo/logs",))
    assert resolved(telemetry("mesh-default", "istio-system", ON), telemetry("logs", "bookinfo", ON),
                    telemetry("quiet", "bookinfo", {"targetRefs": [GATEWAY], **OFF})) == AccessLogging(False, ("bookinfo/quiet",))
    # a Telemetry that says nothing of access logs (tracing only) leaves the level above in force
    assert resolved(telemetry("mesh-default", "istio-system", OFF),
                    telemetry("traces", "bookinfo", {"tracing": [{"randomSamplingPercentage": 5.0}]})) \
        == AccessLogging(False, ("istio-system/mesh-default",))
    # another namespace's Telemetry is not this waypoint's
    assert resolved(telemetry("logs", "other", OFF)) == AccessLogging(True, ())


def test_a_waypoint_with_its_log_off_writes_no_line_and_still_counts_the_request() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1", 0)
            svcs, wls = [service("reviews", "10.96.0.11")], [workload("reviews-v1", "reviews", "v1", backend.port)]
            async with running_proxy(table(svcs, wls, [])) as (proxy, front, log, _n):
                head, _ = await request(front.port, "/reviews/1")
                assert head.status == 200 and len(log) == 1
                proxy.update(table(svcs, wls, [telemetry("mesh-default", "istio-system", OFF)]))
                for _ in range(3):
                    head, _ = await request(front.port, "/reviews/1")
                    assert head.status == 200
                assert len(log) == 1
                from prometheus_client import generate_latest
                metrics = generate_latest(proxy.metrics.registry).decode()
                assert 'istio_requests_total{' in metrics and [
                    line for line in metrics.splitlines()
                    if line.startswith("istio_requests_total{") and 'response_code="200"' in line
                    and line.endswith(" 4.0")], metrics
                proxy.update(table(svcs, wls, [telemetry("mesh-default", "istio-system", ON)]))
                await request(front.port, "/reviews/1")
                assert len(log) == 2
            n.cancel_scope.cancel()

    trio.run(main)
