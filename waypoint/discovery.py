"""The waypoint's discovery handler: the only writer of its configuration.

The waypoint subscribes (role `waypoint`) to Workloads, Services and the L7Configs that name it.  Each
response is one resource type's whole new view (`Update.resources`); the handler compiles a table from
it and the current views of the other types.  A table that compiles cleanly is swapped into the proxy
and the update is accepted (ACK).  If any resource cannot be compiled the update is refused with
`Rejected` (NACK, the errors as its detail) and nothing changes: the proxy keeps its last good table.
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

    def __init__(self, waypoint: str, on_table: Callable[[RouteTable], None], *, allow_http_jwks: bool = False) -> None:
        self.waypoint = waypoint  # "ns/name", as L7Config.waypoints names it
        self.on_table = on_table
        self.allow_http_jwks = allow_http_jwks  # a jwksUri over plain http is refused unless set
        self.views: dict[str, Mapping[str, Message]] = {t: {} for t in SUBSCRIPTIONS}
        self.version = 0
        self.last: CompileResult | None = None
        self.rejected = 0
        self._warned: tuple[str, ...] = ()

    def handle(self, update: Update) -> None:
        """Compile with `update` applied; swap the table in, or raise `Rejected` and change nothing."""
        if update.type_url not in self.views:
            return
        views = {**self.views, update.type_url: dict(update.resources)}
        result = compile_table(self.waypoint, _of(views, rs.WORKLOAD, pb.Workload),
                               _of(views, rs.SERVICE, pb.Service), _of(views, rs.L7_CONFIG, pb.L7Config),
                               self.version + 1, allow_http_jwks=self.allow_http_jwks)
        if result.errors:
            self.rejected += 1
            detail = "; ".join(str(e) for e in result.errors)
            log.warning('{"event": "configuration rejected", "version": "%s", "errors": %d}: %s',
                        update.version, len(result.errors), detail)
            raise Rejected(detail)
        self.views = views
        self.version += 1
        self.last = result
        if result.warnings != self._warned:
            for w in result.warnings:
                log.warning("%s", w)
            self._warned = result.warnings
        self.on_table(result.table)

    def summary(self) -> dict[str, object]:
        """What the admin endpoint shows about the configuration."""
        table = self.last.table if self.last else RouteTable(waypoint=self.waypoint)
        return {
            "waypoint": self.waypoint,
            "version": self.version,
            "rejected_updates": self.rejected,
            "resources": {t.rsplit(".", 1)[-1]: sorted(v) for t, v in self.views.items()},
            "services": sorted(table.services),
            "virtual_services": {h: f"{vs.namespace}/{vs.name}" for h, vs in sorted(table.virtual_services.items())},
            "destination_rules": sorted(table.destination_rules),
            "authorization_policies": [p.ref for p in table.policies],
            "jwt_rules": len(table.jwt_rules),
            "workloads_using_waypoint": sorted(table.waypoint_workloads),
            "warnings": list(self.last.warnings) if self.last else [],
        }


def _of(views: Mapping[str, Mapping[str, Message]], type_url: str, cls: type[Message]) -> list:  # type: ignore[type-arg]
    return [m for m in views[type_url].values() if isinstance(m, cls)]
