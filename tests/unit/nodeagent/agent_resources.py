"""Hand-made discovery resources for the node agent's pure decisions, and the view they make.

A small mesh on three nodes, namespace "default" unless said otherwise:

    sleep     10.244.1.2  node-1  in the mesh (the usual client)
    web-1/2/3 10.244.{1,2,3}.3    in the mesh, behind service web (VIP 10.96.0.20, port 80 -> 8080)
    legacy    10.244.2.9  node-2  not in the mesh
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.pods.source import PodRef
from nodeagent.state import AUTHORIZATION, SERVICE, WORKLOAD, MeshState

WEB_VIP = "10.96.0.20"


def identity(name: str, ns: str = "default") -> SpiffeId:
    return SpiffeId("cluster.local", ns, name)


def workload(name: str, ip: str, *, ns: str = "default", node: str = "node-1", sa: str = "", mesh: bool = True,
             healthy: bool = True, services: dict[str, dict[int, int]] | None = None,
             waypoint: pb.GatewayAddress | None = None, is_waypoint: bool = False) -> pb.Workload:
    """`services`: "<namespace>/<hostname>" -> {service port: target port}."""
    w = pb.Workload(uid=f"{ns}/{name}", name=name, namespace=ns, addresses=[ip], node=node,
                    service_account=sa or name, tunnel_protocol=pb.HBONE if mesh else pb.NONE,
                    status=pb.HEALTHY if healthy else pb.UNHEALTHY, is_waypoint=is_waypoint)
    for key, ports in (services or {}).items():
        w.services[key].ports.extend(pb.PortMapping(service_port=s, target_port=t) for s, t in ports.items())
    if waypoint is not None:
        w.waypoint.CopyFrom(waypoint)
    return w


def hostname(name: str, ns: str = "default") -> str:
    return f"{name}.{ns}.svc.cluster.local"


def service(name: str, vip: str, ports: dict[int, int], endpoints: Iterable[pb.Workload] = (), *,
            ns: str = "default", waypoint: pb.GatewayAddress | None = None) -> pb.Service:
    svc = pb.Service(name=name, namespace=ns, hostname=hostname(name, ns), vips=[vip],
                     ports=[pb.ServicePort(service_port=s, target_port=t) for s, t in ports.items()],
                     endpoints=[pb.ServiceEndpoint(workload_uid=w.uid, addresses=w.addresses) for w in endpoints])
    if waypoint is not None:
        svc.waypoint.CopyFrom(waypoint)
    return svc


def waypoint_by_service(name: str, ns: str = "default") -> pb.GatewayAddress:
    """A waypoint reached through its service's ready instances (its identity: theirs)."""
    return pb.GatewayAddress(hostname=pb.NamespacedHostname(namespace=ns, hostname=hostname(name, ns)),
                             name=name, namespace=ns)


def view(*resources: pb.Workload | pb.Service | pb.Authorization) -> MeshState:
    """The agent's read model holding exactly `resources`, applied as discovery applies them."""
    state = MeshState()
    state.apply(WORKLOAD, {r.uid: r for r in resources if isinstance(r, pb.Workload)}, ())
    state.apply(SERVICE, {f"{r.namespace}/{r.hostname}": r for r in resources if isinstance(r, pb.Service)}, ())
    state.apply(AUTHORIZATION, {f"{r.namespace}/{r.name}": r for r in resources
                                if isinstance(r, pb.Authorization)}, ())
    return state


def pod_of(w: pb.Workload) -> PodRef:
    return PodRef(uid=w.uid, namespace=w.namespace, name=w.name, ip=w.addresses[0],
                  identity=identity(w.service_account, w.namespace), netns=f"/run/netns/{w.name}")


WEB_KEY = f"default/{hostname('web')}"
SLEEP = workload("sleep", "10.244.1.2")
WEB = [workload(f"web-{i}", f"10.244.{i}.3", node=f"node-{i}", sa="web", services={WEB_KEY: {80: 8080}})
       for i in (1, 2, 3)]
WEB_SVC = service("web", WEB_VIP, {80: 8080}, WEB)
LEGACY = workload("legacy", "10.244.2.9", node="node-2", mesh=False)
