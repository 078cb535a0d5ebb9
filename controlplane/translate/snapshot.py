"""Translation: a configuration snapshot in, discovery resources out.  Pure: no I/O, no clock, no state.

    translation = translate_snapshot(store.snapshot())
    translation.workloads       {uid: Workload}                     (resource name = uid)
    translation.services        {"<ns>/<hostname>": Service}
    translation.authorizations  {"<ns>/<name>": Authorization}      (L4 policies for node agents)
    translation.l7              {"<Kind>/<ns>/<name>": L7Config}    (for waypoints)
    translation.problems        ("what is wrong and what happens", ...) for the control plane's log
    translate(snapshot)         every message as one list (what the discovery source serves); logs problems

The keys are the xDS resource names of `mesh.xds.resources.name_of`.  The rules are in the modules that
apply them: `translate_workloads` (pods, services, enrollment, waypoints), `translate_authz` (L4
authorization), `translate_l7` (waypoint configuration).  The snapshot is anything with
`of_kind(kind) -> [body]` (`controlplane.config.source.Snapshot`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from controlplane.translate.authz import build_authorizations
from controlplane.translate.l7 import build_l7
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

    def messages(self) -> list[Message]:
        return [*self.workloads.values(), *self.services.values(), *self.authorizations.values(), *self.l7.values()]


def translate_snapshot(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Translation:
    index = build_index(snapshot, trust_domain)
    services = build_services(index)
    workloads = build_workloads(index)
    problems = index.problems
    authorizations = build_authorizations(snapshot, problems)
    l7 = build_l7(snapshot, services, set(index.waypoints), problems)
    return Translation(int(getattr(snapshot, "version", 0)), workloads, services, authorizations, l7,
                       tuple(dict.fromkeys(problems)))


def translate(snapshot: Any, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> list[Message]:
    """Every discovery message for `snapshot` (the function the discovery source calls)."""
    translation = translate_snapshot(snapshot, trust_domain)
    for problem in translation.problems:
        log.warning("translation version=%d: %s", translation.version, problem)
    return translation.messages()
