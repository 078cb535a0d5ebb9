"""The node agent's view of the mesh: workloads, services and authorization policies.

A read model (STYLE.md 3): only the discovery handler changes it, through `apply()`, which takes one
update for one resource type and swaps the indexes in whole, so a reader never sees half an update.
Proxies only read it (lookups by uid, address, VIP, hostname); they never see the discovery client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from mesh.bounded import BoundedMemo
from mesh.policy.scope import applies_to
from mesh.proto import discovery_pb2 as pb

WORKLOAD = "workload"
SERVICE = "service"
AUTHORIZATION = "authorization"
DERIVED_ENTRIES = 4096  # (keys partly from connections: a destination port)
M = TypeVar("M", pb.Workload, pb.Service, pb.Authorization)


@dataclass(frozen=True)
class _Indexes:
    workloads: Mapping[str, pb.Workload] = field(default_factory=dict)  # by uid
    by_address: Mapping[str, pb.Workload] = field(default_factory=dict)
    services: Mapping[str, pb.Service] = field(default_factory=dict)  # by resource name
    by_vip: Mapping[str, pb.Service] = field(default_factory=dict)
    by_hostname: Mapping[str, pb.Service] = field(default_factory=dict)
    policies: Mapping[str, pb.Authorization] = field(default_factory=dict)  # by ns/name
    # What the proxies derive from these indexes alone, kept as long as they are (a new update starts
    # with an empty one): see `MeshState.derived`.
    derived: BoundedMemo[object, object] = field(default_factory=lambda: BoundedMemo(DERIVED_ENTRIES), init=False,
                                                 compare=False, repr=False)


def _merged(current: Mapping[str, M], upserts: Mapping[str, object], removals: Iterable[str],
            cls: type[M]) -> dict[str, M]:
    out = dict(current)
    for name in removals:
        out.pop(name, None)
    for name, msg in upserts.items():
        if not isinstance(msg, cls):
            raise TypeError(f"{name}: expected a {cls.__name__}, got {type(msg).__name__}")
        out[name] = msg
    return out


class MeshState:
    """Everything the agent knows, replaced atomically per update."""

    def __init__(self) -> None:
        self._ix = _Indexes()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self.version: dict[str, str] = {}

    # -- writes (discovery handler only) -----------------------------------------------------------

    def apply(self, kind: str, upserts: Mapping[str, object], removals: Iterable[str], version: str = "") -> None:
        with self._lock:
            ix = self._ix
            if kind == WORKLOAD:
                workloads = _merged(ix.workloads, upserts, removals, pb.Workload)
                by_address = {a: w for w in workloads.values() for a in w.addresses}
                ix = replace(ix, workloads=workloads, by_address=by_address)
            elif kind == SERVICE:
                services = _merged(ix.services, upserts, removals, pb.Service)
                ix = replace(ix, services=services, by_vip={v: s for s in services.values() for v in s.vips},
                             by_hostname={s.hostname: s for s in services.values()})
            elif kind == AUTHORIZATION:
                ix = replace(ix, policies=_merged(ix.policies, upserts, removals, pb.Authorization))
            else:
                raise ValueError(f"unknown resource kind {kind!r}")
            self._ix = ix
            if version:
                self.version[kind] = version
            listeners = list(self._listeners)
        for listener in listeners:
            listener(kind)

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(kind)` after each applied update (from the updating thread)."""
        self._listeners.append(listener)

    # -- reads -------------------------------------------------------------------------------------

    @property
    def derived(self) -> BoundedMemo[object, object]:
        """A memo for what is computed from the state alone on the data path (a service port's healthy
        endpoints), which belongs to the state as it is now: an update replaces it with an empty one
        together with the indexes, so nothing derived from an older state is read after it (nor kept,
        as what a reader derives while an update lands goes into the memo it read first).  Keys are
        the caller's; at most `DERIVED_ENTRIES` entries."""
        return self._ix.derived

    def workload(self, uid: str) -> pb.Workload | None:
        return self._ix.workloads.get(uid)

    def workload_by_address(self, ip: str) -> pb.Workload | None:
        return self._ix.by_address.get(ip)

    def service_by_vip(self, ip: str) -> pb.Service | None:
        return self._ix.by_vip.get(ip)

    def service_by_hostname(self, hostname: str) -> pb.Service | None:
        return self._ix.by_hostname.get(hostname)

    def workloads(self) -> list[pb.Workload]:
        return list(self._ix.workloads.values())

    def services(self) -> list[pb.Service]:
        return list(self._ix.services.values())

    def workloads_on(self, node: str) -> list[pb.Workload]:
        return [w for w in self._ix.workloads.values() if w.node == node]

    def policies(self) -> list[pb.Authorization]:
        return list(self._ix.policies.values())

    def policies_for(self, workload: pb.Workload, root_namespace: str = "istio-system") -> list[pb.Authorization]:
        """The policies that apply to a destination workload: global ones, its namespace's, and those
        whose selector matches its labels (in its namespace, or in the root namespace for any)."""
        return [p for p in self._ix.policies.values()
                if applies_to(p, workload.namespace, workload.labels, root_namespace)]
