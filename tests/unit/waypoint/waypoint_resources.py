"""Builders for discovery resources shaped like the bookinfo sample, shared by the waypoint tests."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from mesh.proto import discovery_pb2 as pb
from waypoint.config import compile_table

NS = "bookinfo"
WAYPOINT = "bookinfo/waypoint"
KINDS = {"VirtualService": pb.VIRTUAL_SERVICE, "DestinationRule": pb.DESTINATION_RULE,
         "AuthorizationPolicy": pb.AUTHORIZATION_POLICY, "RequestAuthentication": pb.REQUEST_AUTHENTICATION}


def fq(name: str, ns: str = NS) -> str:
    return f"{name}.{ns}.svc.cluster.local"


def service(name: str, vip: str, port: int = 9080, ns: str = NS, app_protocol: str = "",
            waypoint: str = "waypoint") -> pb.Service:
    """A service bound to the waypoint `waypoint` of its namespace ("": to none)."""
    return pb.Service(name=name, namespace=ns, hostname=fq(name, ns), vips=[vip],
                      ports=[pb.ServicePort(service_port=port, target_port=port, name="http", app_protocol=app_protocol)],
                      waypoint=pb.GatewayAddress(name=waypoint, namespace=ns) if waypoint else None)


def workload(name: str, ip: str, svc: str, version: str = "v1", ns: str = NS, port: int = 9080,
             target_port: int = 0, sa: str = "") -> pb.Workload:
    app = svc
    return pb.Workload(uid=f"{ns}/{name}", name=name, namespace=ns, addresses=[ip], service_account=sa or f"bookinfo-{app}",
                       tunnel_protocol=pb.HBONE, canonical_name=app, canonical_revision=version,
                       labels={"app": app, "version": version},
                       services={f"{ns}/{fq(svc, ns)}": pb.PortList(ports=[pb.PortMapping(
                           service_port=port, target_port=target_port or port)])})


def l7(kind: str, name: str, spec: dict[str, Any], hostnames: list[str] | None = None, ns: str = NS,
       waypoints: list[str] | None = None) -> pb.L7Config:
    s = struct_pb2.Struct()
    json_format.ParseDict(spec, s)
    return pb.L7Config(kind=KINDS[kind], name=name, namespace=ns, api_version="networking.istio.io/v1",
                       waypoints=waypoints if waypoints is not None else [WAYPOINT],
                       hostnames=hostnames or [], spec=s)


def bookinfo() -> tuple[list[pb.Workload], list[pb.Service]]:
    services = [service("productpage", "10.96.0.10"), service("reviews", "10.96.0.11"),
                service("ratings", "10.96.0.12"), service("details", "10.96.0.13")]
    workloads = [workload("productpage-v1", "10.244.1.10", "productpage"),
                 workload("reviews-v1", "10.244.1.11", "reviews", "v1"),
                 workload("reviews-v2", "10.244.1.12", "reviews", "v2"),
                 workload("reviews-v3", "10.244.2.13", "reviews", "v3"),
                 workload("ratings-v1", "10.244.2.14", "ratings"),
                 workload("details-v1", "10.244.2.15", "details")]
    return workloads, services


REVIEWS_DR = {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                             {"name": "v2", "labels": {"version": "v2"}},
                                             {"name": "v3", "labels": {"version": "v3"}}]}
RATINGS_DR = {"host": "ratings", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}


def table_with(*configs: pb.L7Config) -> Any:
    workloads, services = bookinfo()
    result = compile_table(WAYPOINT, workloads, services,
                           [l7("DestinationRule", "reviews", REVIEWS_DR, [fq("reviews")]),
                            l7("DestinationRule", "ratings", RATINGS_DR, [fq("ratings")]), *configs])
    assert not result.errors, result.errors
    return result.table
