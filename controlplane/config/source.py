"""The configuration source interface: what translation and the discovery server read.

A source offers a consistent `Snapshot` of every resource and tells subscribers when it changes:

    snap = source.snapshot()                 # immutable: version + {Ref: body}
    unsubscribe = source.subscribe(on_change) # on_change(ChangeEvent) after every committed change

`controlplane.config.store.Store` is the source in both modes: fed by `meshctl apply` through the apply API
and by the local cluster at start (local), or by the cluster's list and watch streams
(`controlplane.config.kubernetes`), so nothing downstream changes.

Callbacks run synchronously in the thread that committed the change, in commit order, while the
source's lock is held: they must be quick and must not call back into the source's write methods.  A
consumer on an event loop hands the event over, e.g. `loop.call_soon_threadsafe(queue.put_nowait, ev)`
for asyncio or `trio.from_thread.run_sync(send_channel.send_nowait, ev, trio_token=token)` for trio,
and then reads `source.snapshot()` itself; events may be coalesced by the consumer (only the newest
snapshot matters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from mesh.api.validate import Ref


@dataclass(frozen=True)
class Snapshot:
    """Every resource at one `version`.  Bodies are shared with the store: read them, never change them."""

    version: int
    resources: Mapping[Ref, dict[str, Any]] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.resources.get(Ref(kind, namespace, name))

    def of_kind(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Bodies of `kind` (in `namespace` if given), sorted by namespace and name."""
        return [
            body for ref, body in sorted(self.resources.items())
            if ref.kind == kind and (namespace is None or ref.namespace == namespace)
        ]

    def __iter__(self) -> Iterator[Ref]:
        return iter(self.resources)

    def __len__(self) -> int:
        return len(self.resources)


@dataclass(frozen=True)
class ChangeEvent:
    """One committed change: the new version, the resources added, changed or removed, and their kinds."""

    version: int
    changed: frozenset[Ref]
    removed: frozenset[Ref] = frozenset()

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(r.kind for r in self.changed | self.removed)


Callback = Callable[[ChangeEvent], None]


class ConfigSource(Protocol):
    def snapshot(self) -> Snapshot: ...

    def subscribe(self, callback: Callback) -> Callable[[], None]: ...
