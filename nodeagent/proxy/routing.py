"""The outbound routing decision, as a value: where a captured connection goes, and how.

`decide(view, source, dst_ip, dst_port, rng)` looks only at the mesh state and returns a `Route`; the
outbound proxy then carries it out with one I/O function per kind.  Most tests are on this step.

- A service VIP: the service's waypoint if it has one; otherwise one healthy endpoint chosen at random
  (then that endpoint's waypoint if it has one, HBONE if it is in the mesh, plain TCP if not).
- A workload address: its waypoint, HBONE to its 15008 if it is in the mesh, or plain TCP.
- Anything else: plain TCP to where the application was going (passthrough).
- ServiceEntry hosts are services like the others, with three differences: one the source's namespace
  may not see (`exportTo`) is unknown to it; one with resolution NONE passes the connection through to
  where the application sent it; an endpoint known by name only (resolution DNS) is a passthrough to
  that name, which the outbound proxy resolves when it connects (`Route.resolve`).  Their external
  endpoints are not in the mesh, so they are reached in plain TCP from the source's agent.
- Refused first, before any of that: a call to the agent itself (`selfcall`): loopback, the listener the
  connection arrived at, an agent port of this pod; and, once the endpoint is chosen, an agent port of
  the workload an HBONE tunnel would ask its agent to connect to.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import cast

from mesh import defaults
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.proxy.selfcall import agent_port, self_call
from nodeagent.redirect.rules import HBONE_PORT
from nodeagent.state import MeshState


class RouteKind(enum.Enum):
    HBONE = "hbone"  # to the destination pod's node agent, port 15008
    WAYPOINT = "waypoint"  # to the waypoint over HBONE, which picks the endpoint
    PASSTHROUGH = "passthrough"  # plain TCP: the destination is not in the mesh
    REFUSE = "refuse"  # nowhere to send it (a service without healthy endpoints)
    SELF_CALL = "self call"  # addressed to the node agent itself: refused, never dialled


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    next_hop: tuple[str, int] | None  # the address to connect to
    authority: str  # the HBONE CONNECT :authority (the original or chosen destination)
    expected: tuple[SpiffeId, ...] = ()  # identities the next hop may present
    service: pb.Service | None = None
    workload: pb.Workload | None = None  # the destination workload, when known
    reason: str = ""
    resolve: str = ""  # PASSTHROUGH to a name (a DNS ServiceEntry's endpoint): next_hop is None, the port is
    # `resolve_port`; the outbound proxy resolves the name when it connects
    resolve_port: int = 0

    @property
    def tunnelled(self) -> bool:
        """Carried over HBONE (mutual TLS), to the destination's node agent or to a waypoint."""
        return self.kind in (RouteKind.HBONE, RouteKind.WAYPOINT)


def workload_identity(w: pb.Workload) -> SpiffeId:
    return SpiffeId(w.trust_domain or defaults.TRUST_DOMAIN, w.namespace, w.service_account or "default")


def service_key(svc: pb.Service) -> str:
    return f"{svc.namespace}/{svc.hostname}"


def target_port(w: pb.Workload, svc: pb.Service, port: int) -> int | None:
    """The workload port behind `svc`'s `port`, from the workload's own service map, else the service's."""
    mapping = w.services.get(service_key(svc))
    if mapping is not None:
        for p in mapping.ports:
            if p.service_port == port:
                return p.target_port or port
    for sp in svc.ports:
        if sp.service_port == port:
            return sp.target_port or port
    return None


def endpoints(view: MeshState, svc: pb.Service, port: int) -> list[tuple[pb.Workload, int]]:
    """Healthy workloads behind a service port, with the port each listens on (worked out once per
    state: `MeshState.derived`; the list is shared, not to be changed)."""
    memo = view.derived
    key = ("endpoints", id(svc), port)
    found = cast("tuple[pb.Service, list[tuple[pb.Workload, int]]] | None", memo.get(key))
    if found is not None and found[0] is svc:  # (the very record: an id is reused only once it is gone)
        return found[1]
    ready = _endpoints(view, svc, port)
    memo.keep(key, (svc, ready))
    return ready


def _endpoints(view: MeshState, svc: pb.Service, port: int) -> list[tuple[pb.Workload, int]]:
    out = []
    for w in (view.workload(e.workload_uid) for e in svc.endpoints):
        if w is None or w.status != pb.HEALTHY or not (w.addresses or w.hostname):
            continue
        tp = target_port(w, svc, port)
        if tp is not None:
            out.append((w, tp))
    return out


def visible(svc: pb.Service, source: pb.Workload | None) -> bool:
    """Whether the source's namespace may use the service (a ServiceEntry's `exportTo`)."""
    return not svc.export_to or source is None or source.namespace in svc.export_to


def waypoint_of(view: MeshState, gw: pb.GatewayAddress,
                rng: random.Random | None = None) -> tuple[tuple[str, int], tuple[SpiffeId, ...]] | None:
    """The address and identities of one ready instance of a waypoint, or None when it has none."""
    port = gw.hbone_mtls_port or HBONE_PORT
    expected = (SpiffeId.parse(gw.identity),) if gw.identity else ()
    if gw.HasField("address"):
        return (gw.address.address, port), expected
    svc = view.service_by_hostname(gw.hostname.hostname)
    instances = [view.workload(e.workload_uid) for e in svc.endpoints] if svc is not None else []
    ready = [w for w in instances if w is not None and w.status == pb.HEALTHY and w.addresses]
    if not ready:
        return None
    w = (rng or random).choice(ready)
    return (w.addresses[0], port), expected or (workload_identity(w),)


def _to_workload(view: MeshState, w: pb.Workload, port: int, authority: str, svc: pb.Service | None,
                 source: pb.Workload | None) -> Route:
    if w.HasField("waypoint") and not (source is not None and source.is_waypoint):
        found = waypoint_of(view, w.waypoint)
        if found is None:
            return Route(RouteKind.REFUSE, None, authority, service=svc, workload=w,
                         reason=f"waypoint of {w.namespace}/{w.name} has no ready instance")
        hop, expected = found
        return Route(RouteKind.WAYPOINT, hop, authority, expected, svc, w, "workload uses a waypoint")
    memo = view.derived  # (a route to the workload itself depends on these records alone: worked out once)
    key = ("route", id(w), port, authority, id(svc))
    known = cast("Route | None", memo.get(key))
    if known is not None and known.workload is w and known.service is svc:
        return known
    route = _direct(w, port, authority, svc)
    memo.keep(key, route)
    return route


def _direct(w: pb.Workload, port: int, authority: str, svc: pb.Service | None) -> Route:
    """To the workload itself: HBONE to its agent, or plain TCP."""
    if not w.addresses:  # known by name only: resolved when connecting
        return Route(RouteKind.PASSTHROUGH, None, f"{w.hostname}:{port}", (), svc, w,
                     "destination is resolved by name (DNS ServiceEntry)", resolve=w.hostname, resolve_port=port)
    ip = w.addresses[0]
    if w.tunnel_protocol == pb.HBONE:
        return Route(RouteKind.HBONE, (ip, HBONE_PORT), f"{ip}:{port}", (workload_identity(w),), svc, w,
                     "destination is in the mesh")
    return Route(RouteKind.PASSTHROUGH, (ip, port), f"{ip}:{port}", (), svc, w, "destination is not in the mesh")


def decide(view: MeshState, source: pb.Workload | None, dst_ip: str, dst_port: int,
           rng: random.Random | None = None, *, pod_ip: str = "",
           arrived_at: tuple[str, int] | None = None) -> Route:
    """The route of a connection the application of `source` (at `pod_ip`) sent to `dst_ip:dst_port`;
    `arrived_at` is the local address of the agent's accepted socket (where the capture delivered it)."""
    own = {pod_ip, *(source.addresses if source is not None else ())} - {""}
    why = self_call(dst_ip, dst_port, own_ips=own, arrived_at=arrived_at)
    if why is not None:
        return Route(RouteKind.SELF_CALL, None, f"{dst_ip}:{dst_port}", reason=why)
    route = _decide(view, source, dst_ip, dst_port, rng)
    if route.kind is RouteKind.HBONE:  # the destination's agent would connect to this port of its pod
        why = agent_port(int(route.authority.rpartition(":")[2]))
        if why is not None:
            return Route(RouteKind.SELF_CALL, None, route.authority, service=route.service,
                         workload=route.workload, reason=why)
    return route


def _decide(view: MeshState, source: pb.Workload | None, dst_ip: str, dst_port: int,
            rng: random.Random | None) -> Route:
    authority = f"{dst_ip}:{dst_port}"
    svc = view.service_by_vip(dst_ip)
    if svc is not None and not visible(svc, source):
        svc = None
    if svc is not None and svc.resolution == pb.RESOLUTION_NONE:
        return Route(RouteKind.PASSTHROUGH, (dst_ip, dst_port), authority, service=svc,
                     reason="service entry with resolution NONE: to the original destination")
    if svc is not None:
        if svc.HasField("waypoint") and not (source is not None and source.is_waypoint):
            found = waypoint_of(view, svc.waypoint)
            if found is None:
                return Route(RouteKind.REFUSE, None, authority, service=svc,
                             reason=f"waypoint of service {svc.hostname} has no ready instance")
            hop, expected = found
            return Route(RouteKind.WAYPOINT, hop, authority, expected, svc, None, "service uses a waypoint")
        ready = endpoints(view, svc, dst_port)
        if not ready:
            return Route(RouteKind.REFUSE, None, authority, service=svc,
                         reason=f"service {svc.hostname} has no healthy endpoint for port {dst_port}")
        w, port = (rng or random).choice(ready)
        return _to_workload(view, w, port, authority, svc, source)
    w = view.workload_by_address(dst_ip)
    if w is not None:
        return _to_workload(view, w, dst_port, authority, None, source)
    return Route(RouteKind.PASSTHROUGH, (dst_ip, dst_port), authority, reason="destination unknown to the mesh")
