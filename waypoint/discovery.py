"""The waypoint's discovery handler: the only writer of its configuration.

The waypoint subscribes (role `waypoint`) to Workloads, Services and the L7Configs that name it.  Each
response is one resource type's whole new view (`Update.resources`); the handler compiles a table from
it and the current views of the other types, and swaps it into the proxy.

Acceptance is per resource, so one bad resource never holds back the good ones it came with (a DENY
applied beside a broken RequestAuthentication is enforced).  An L7Config that does not compile is left
out, or, if an earlier version of it compiled, that version is kept (as a NACK would have kept it: a
policy that turns bad is not dropped); the rest is applied and the update ACKed.  What was left out is
logged and shown, with the reason, in the admin config dump (`rejected_resources`).  Only a response of
which nothing could be applied (every resource it brings fails, and it removes nothing) is refused with
`Rejected` (NACK, the errors as its detail), and then nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from google.protobuf.message import Message

from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.client_state import Update
from mesh.xds.errors import Rejected
from waypoint.config import CompileResult, RouteTable, compile_table

log = logging.getLogger("waypoint.discovery")

SUBSCRIPTIONS: dict[str, None] = {rs.WORKLOAD: None, rs.SERVICE: None, rs.L7_CONFIG: None}


class WaypointConfig:
    """The views the table is compiled from, and the last good compile."""

    def __init__(self, waypoint: str, on_table: Callable[[RouteTable], None], *, allow_http_jwks: bool = False,
                 ingress: bool = False) -> None:
        self.waypoint = waypoint  # "ns/name", as L7Config.waypoints names it
        self.ingress = ingress  # an ingress gateway's configuration (`compile_table`)
        self.on_table = on_table
        self.allow_http_jwks = allow_http_jwks  # a jwksUri over plain http is refused unless set
        self.views: dict[str, Mapping[str, Message]] = {t: {} for t in SUBSCRIPTIONS}
        self.version = 0
        self.last: CompileResult | None = None
        self.rejected = 0
        self.failed: dict[str, str] = {}  # L7Config name -> why it is left out (or held at an earlier version)
        self._good: dict[str, pb.L7Config] = {}  # the last version of each L7Config that compiled
        self._warned: tuple[str, ...] = ()

    def handle(self, update: Update) -> None:
        """Compile with `update` applied and swap the table in, leaving out (or holding at their last good
        version) the L7Configs that do not compile; raise `Rejected` and change nothing only when nothing
        of `update` could be applied."""
        if update.type_url not in self.views:
            return
        views = {**self.views, update.type_url: dict(update.resources)}
        configs = {n: m for n, m in views[rs.L7_CONFIG].items() if isinstance(m, pb.L7Config)}
        result = self._compile(views, configs)
        failed = dict(result.failed)
        if failed:
            # Hold each failed resource at its last good version, if it had one, and compile again.
            held = {n: self._good[n] for n in failed if n in self._good}
            result = self._compile(views, {**{n: m for n, m in configs.items() if n not in failed}, **held})
            failed.update(result.failed)
            for n in failed:
                if n in held and n not in result.failed:
                    failed[n] += " (its previous version is still applied)"
        if update.updated and set(update.updated) <= set(failed) and not update.removed:
            self.rejected += 1
            detail = "; ".join(failed[n] for n in sorted(update.updated))
            log.warning('{"event": "configuration rejected", "version": "%s", "errors": %d}: %s',
                        update.version, len(update.updated), detail)
            raise Rejected(detail)
        for name, reason in sorted(failed.items()):
            if self.failed.get(name) != reason:
                log.warning('{"event": "resource rejected", "version": "%s", "resource": "%s"}: %s',
                            update.version, name, reason)
        self.failed = failed
        self._good = {n: m for n, m in configs.items() if n not in failed} | \
            {n: m for n, m in self._good.items() if n in failed and n in configs}
        self.views = views
        self.version += 1
        self.last = result
        if result.warnings != self._warned:
            for w in result.warnings:
                log.warning("%s", w)
            self._warned = result.warnings
        self.on_table(result.table)

    def _compile(self, views: Mapping[str, Mapping[str, Message]], configs: Mapping[str, pb.L7Config]) -> CompileResult:
        return compile_table(self.waypoint, _of(views, rs.WORKLOAD, pb.Workload), _of(views, rs.SERVICE, pb.Service),
                             list(configs.values()), self.version + 1, allow_http_jwks=self.allow_http_jwks,
                             ingress=self.ingress)

    def summary(self) -> dict[str, object]:
        """What the admin endpoint shows about the configuration."""
        table = self.last.table if self.last else RouteTable(waypoint=self.waypoint, ingress=self.ingress)
        return {
            "waypoint": self.waypoint,
            "version": self.version,
            "rejected_updates": self.rejected,
            "rejected_resources": dict(sorted(self.failed.items())),
            "resources": {t.rsplit(".", 1)[-1]: sorted(v) for t, v in self.views.items()},
            "services": sorted(table.services),
            "virtual_services": {h: f"{vs.namespace}/{vs.name}" for h, vs in sorted(table.virtual_services.items())},
            **({"ingress_routes": {f"{vs.namespace}/{vs.name}": list(vs.hosts) for vs in table.ingress_routes}}
               if table.ingress else {}),
            "destination_rules": sorted(table.destination_rules),
            "authorization_policies": [p.ref for p in table.policies],
            "jwt_rules": len(table.jwt_rules),
            "tracing": {"sampling": table.tracing.percentage, "reporting": table.tracing.reporting,
                        "telemetry": list(table.tracing.sources)},
            "access_log": {"enabled": table.access_log.enabled, "telemetry": list(table.access_log.sources)},
            "workloads_using_waypoint": sorted(table.waypoint_workloads),
            "warnings": list(self.last.warnings) if self.last else [],
        }


def _of(views: Mapping[str, Mapping[str, Message]], type_url: str, cls: type[Message]) -> list:  # type: ignore[type-arg]
    return [m for m in views[type_url].values() if isinstance(m, cls)]
