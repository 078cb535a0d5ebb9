"""Where the discovery server gets its resources: the "source of truth" interface and two sources.

A source is anything with

    resources() -> {type_url: {name: (version, Any)}}    everything to serve, now
    watch(callback) -> cancel                              call `callback()` (from any thread) after
                                                           every change; `cancel()` stops that
    errors() -> ("what was left out and why", ...)         resources that could not be made (shown by
                                                           proxy-status); translation is total, so
                                                           these never stop the others

The server calls `resources()` after each notification (changes close together are coalesced), works
out which names changed by comparing versions, and pushes only those.  Versions must change when the
content changes; `mesh.xds.resources.version_of` (a content hash) is the easy way.

- `MemorySource`: resources set and removed directly (tests, benchmarks).
- `TranslatedSource`: the translation of the configuration store, packed, named and versioned once per
  store version, on the first `resources()` call after a change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane.discovery.state import Resources
from mesh.xds import resources as rs

Callback = Callable[[], None]
Entry = tuple[str, any_pb2.Any]  # (version, packed resource)


def entry(msg: Message) -> tuple[str, str, Entry]:
    """(type URL, resource name, (version, packed)) of one discovery message."""
    packed = rs.pack(msg)
    return packed.type_url, rs.name_of(msg), (rs.version_of(packed), packed)


def by_type(messages: Iterable[Message]) -> dict[str, dict[str, Entry]]:
    out: dict[str, dict[str, Entry]] = {t: {} for t in rs.ALL_TYPES}
    for msg in messages:
        type_url, name, value = entry(msg)
        out.setdefault(type_url, {})[name] = value
    return out


class ResourceSource(Protocol):
    def resources(self) -> Resources: ...

    def watch(self, callback: Callback) -> Callable[[], None]: ...

    def errors(self) -> tuple[str, ...]: ...


class Translated(Protocol):
    """What a translation function returns (`controlplane.translate.snapshot.Translation`)."""

    @property
    def errors(self) -> tuple[str, ...]: ...

    def messages(self) -> list[Message]: ...


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
    """Resources kept in memory; every `put`/`remove` notifies watchers (unless `quiet`)."""

    def __init__(self, messages: Iterable[Message] = ()) -> None:
        super().__init__()
        self._data = by_type(messages)
        self._data_lock = threading.Lock()

    def resources(self) -> Resources:
        with self._data_lock:
            return {t: dict(v) for t, v in self._data.items()}

    def errors(self) -> tuple[str, ...]:
        return ()

    def put(self, msg: Message, quiet: bool = False) -> None:
        type_url, name, value = entry(msg)
        with self._data_lock:
            self._data.setdefault(type_url, {})[name] = value
        if not quiet:
            self.notify()

    def remove(self, type_url: str, name: str, quiet: bool = False) -> None:
        with self._data_lock:
            self._data.get(type_url, {}).pop(name, None)
        if not quiet:
            self.notify()


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
    """Serves the translation of a configuration source (`controlplane.config.source.ConfigSource`, e.g. the
    store): `translate(config_snapshot)` returns a `Translated` (or just every discovery message).
    Translation runs at most once per configuration version, on the first `resources()` call after a
    change, on the caller's thread (the discovery server calls it off its event loop)."""

    def __init__(self, config: Any, translate: Callable[[Any], Translated | Iterable[Message]]) -> None:
        super().__init__()
        self._config = config
        self._translate = translate
        # Its own lock: the store calls `notify` (the watchers' lock) while holding its lock, so the
        # watchers' lock must never be held while asking the store for a snapshot.
        self._cache_lock = threading.Lock()
        self._version: Any = object()
        self._cache: dict[str, dict[str, Entry]] = {}
        self._errors: tuple[str, ...] = ()
        self._unsubscribe = config.subscribe(lambda _event: self.notify())

    def close(self) -> None:
        self._unsubscribe()

    def resources(self) -> Resources:
        with self._cache_lock:
            snap = self._config.snapshot()
            if snap.version != self._version:
                result = self._translate(snap)
                if isinstance(result, Iterable):
                    self._cache, self._errors = by_type(result), ()
                else:
                    self._cache, self._errors = by_type(result.messages()), tuple(result.errors)
                self._version = snap.version
            return self._cache

    def errors(self) -> tuple[str, ...]:
        """What the current translation left out, and why (read without waiting for a translation)."""
        return self._errors
