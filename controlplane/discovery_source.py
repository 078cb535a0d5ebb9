"""Where the discovery server gets its resources: the "source of truth" interface and two sources.

A source is anything with

    resources() -> {type_url: {name: (version, Any)}}    everything to serve, now
    watch(callback) -> cancel                              call `callback()` (from any thread) after
                                                           every change; `cancel()` stops that

The server calls `resources()` after each notification (changes close together are coalesced), works
out which names changed by comparing versions, and pushes only those.  Versions must change when the
content changes; `mesh.xds.resources.version_of` (a content hash) is the easy way.

- `MemorySource`: resources set and removed directly (tests, benchmarks).
- `MessageSource`: wraps a function that returns every discovery message (the translation of the
  store); call `notify()` after the store changes.  It packs, names and versions the messages once per
  change, on the first `resources()` call after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane.xds_state import Resources
from mesh.xds import resources as rs

Callback = Callable[[], None]


class ResourceSource(Protocol):
    def resources(self) -> Resources: ...

    def watch(self, callback: Callback) -> Callable[[], None]: ...


class _Watchers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callback] = []

    def watch(self, callback: Callback) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def cancel() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return cancel

    def notify(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for cb in callbacks:
            cb()


class MemorySource(_Watchers):
    """Resources kept in memory; every `put`/`remove`/`replace` notifies watchers (unless `quiet`)."""

    def __init__(self, messages: Iterable[Message] = ()) -> None:
        super().__init__()
        self._data: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {t: {} for t in rs.ALL_TYPES}
        self._data_lock = threading.Lock()
        for m in messages:
            self.put(m, quiet=True)

    def resources(self) -> Resources:
        with self._data_lock:
            return {t: dict(v) for t, v in self._data.items()}

    def put(self, msg: Message, quiet: bool = False) -> None:
        packed = rs.pack(msg)
        with self._data_lock:
            self._data.setdefault(packed.type_url, {})[rs.name_of(msg)] = (rs.version_of(packed), packed)
        if not quiet:
            self.notify()

    def remove(self, type_url: str, name: str, quiet: bool = False) -> None:
        with self._data_lock:
            self._data.get(type_url, {}).pop(name, None)
        if not quiet:
            self.notify()

    def replace(self, messages: Iterable[Message]) -> None:
        fresh: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {t: {} for t in rs.ALL_TYPES}
        for m in messages:
            packed = rs.pack(m)
            fresh.setdefault(packed.type_url, {})[rs.name_of(m)] = (rs.version_of(packed), packed)
        with self._data_lock:
            self._data = fresh
        self.notify()


class MessageSource(_Watchers):
    """Serves whatever `produce()` returns; recomputed lazily after `notify()`."""

    def __init__(self, produce: Callable[[], Iterable[Message]]) -> None:
        super().__init__()
        self._produce = produce
        self._lock = threading.Lock()
        self._dirty = True
        self._cache: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {}

    def notify(self) -> None:
        with self._lock:
            self._dirty = True
        super().notify()

    def resources(self) -> Resources:
        with self._lock:
            if self._dirty:
                self._cache = self._build()
                self._dirty = False
            return self._cache

    def _build(self) -> dict[str, dict[str, tuple[str, any_pb2.Any]]]:
        out: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {t: {} for t in rs.ALL_TYPES}
        for m in self._produce():
            packed = rs.pack(m)
            out.setdefault(packed.type_url, {})[rs.name_of(m)] = (rs.version_of(packed), packed)
        return out


def changed_names(old: Resources, new: Resources) -> dict[str, set[str]]:
    """Per type, the names added, removed or whose version differs."""
    out: dict[str, set[str]] = {}
    for type_url in set(old) | set(new):
        a, b = old.get(type_url, {}), new.get(type_url, {})
        names = {n for n, (v, _) in b.items() if n not in a or a[n][0] != v}
        names.update(n for n in a if n not in b)
        if names:
            out[type_url] = names
    return out


class TranslatedSource(_Watchers):
    """Serves the translation of a configuration source (`controlplane.source.ConfigSource`, e.g. the
    store): `translate(config_snapshot)` returns every discovery message.  Translation runs at most
    once per configuration version, on the first `resources()` call after a change, on the caller's
    thread (the discovery server calls it off its event loop)."""

    def __init__(self, config: Any, translate: Callable[[Any], Iterable[Message]]) -> None:
        super().__init__()
        self._config = config
        self._translate = translate
        self._lock = threading.Lock()
        self._version: Any = object()
        self._cache: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {}
        self._unsubscribe = config.subscribe(lambda _event: self.notify())

    def close(self) -> None:
        self._unsubscribe()

    def resources(self) -> Resources:
        with self._lock:
            snap = self._config.snapshot()
            if snap.version != self._version:
                out: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {t: {} for t in rs.ALL_TYPES}
                for m in self._translate(snap):
                    packed = rs.pack(m)
                    out.setdefault(packed.type_url, {})[rs.name_of(m)] = (rs.version_of(packed), packed)
                self._cache, self._version = out, snap.version
            return self._cache
