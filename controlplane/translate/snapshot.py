"""Translation: a configuration snapshot in, discovery resources out.  Pure: no I/O, no clock, no state.

    translation = translate_snapshot(store.snapshot())
    translation.workloads       {uid: Workload}                     (resource name = uid)
    translation.services        {"<ns>/<hostname>": Service}
    translation.authorizations  {"<ns>/<name>": Authorization}      (L4 policies for node agents)
    translation.l7              {"<Kind>/<ns>/<name>": L7Config}    (for waypoints)
    translation.problems        ("what is wrong and what happens", ...) for the control plane's log
    translation.errors          ("<Kind ns/name>: cannot be translated (...): left out", ...): resources
                                left out (translation is total: one never stops the others, see
                                `controlplane.translate.guard`); logged, and shown by `proxy-status`
    translate(snapshot)         every message as one list (what the discovery source serves); logs problems
    translate_logged(snapshot)  the Translation, its problems and errors logged (what the source uses)

The keys are the xDS resource names of `mesh.xds.resources.name_of`.  The rules are in the modules that
apply them: `translate_workloads` (pods, services, enrollment, waypoints), `serviceentries`
(ServiceEntry hosts as services, their endpoints as workloads), `translate_authz` (L4
authorization), `translate_l7` (waypoint configuration), `gatewayapi` (HTTPRoute and GRPCRoute: their
VirtualService-shaped configurations for waypoints, and the VirtualService hosts they take over).  The snapshot is anything with
`of_kind(kind) -> [body]` (`controlplane.config.source.Snapshot`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from controlplane.translate.authz import build_authorizations
from controlplane.translate.gatewayapi import gateway_routes
from controlplane.translate.l7 import build_l7
from controlplane.translate.serviceentries import build_service_entries
from controlplane.translate.workloads import (
    DEFAULT_TRUST_DOMAIN,
    build_index,
    build_services,
    build_workloads,
)
from mesh.proto import discovery_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Translation:
    version: int
    workloads: dict[str, pb.Workload]
    services: dict[str, pb.Service]
    authorizations: dict[str, pb.Authorization]
    l7: dict[str, pb.L7Config]
    problems: tuple[str, ...]
    errors: tuple[str, ...] = ()

    def messages(self) -> list[Message]:
        return [*self.workloads.values(), *self.services.values(), *self.authorizations.values(), *self.l7.values()]


def translate_snapshot(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Translation:
    index = build_index(snapshot, trust_domain)
    services = build_services(index)
    entries = build_service_entries(snapshot, index)
    workloads = build_workloads(index, services, entries.memberships)
    services.update(entries.services)
    workloads.update(entries.workloads)
    problems, errors = index.problems, index.errors
    authorizations = build_authorizations(snapshot, problems, errors)
    l7 = build_l7(snapshot, services, set(index.waypoints), problems, errors)
    l7 = gateway_routes(snapshot, services, set(index.waypoints), l7, problems, errors)
    return Translation(int(getattr(snapshot, "version", 0)), workloads, services, authorizations, l7,
                       tuple(dict.fromkeys(problems)), tuple(dict.fromkeys(errors)))


def translate_logged(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Translation:
    """`translate_snapshot`, with its problems (warnings) and errors logged."""
    translation = translate_snapshot(snapshot, trust_domain)
    for problem in translation.problems:
        log.warning("translation version=%d: %s", translation.version, problem)
    for error in translation.errors:
        log.error("translation version=%d: %s", translation.version, error)
    return translation


def translate(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> list[Message]:
    """Every discovery message for `snapshot`."""
    return translate_logged(snapshot, trust_domain).messages()
