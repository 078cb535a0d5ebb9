"""The configuration store: every resource in memory, persisted, versioned, observable.

    store = Store(state_dir / "controlplane" / "store")   # loads what a previous run saved
    result = store.apply(documents)        # all-or-nothing; raises ValidationError listing every mistake
    store.delete(documents)                # by file, same rules; store.delete_refs([Ref(...)]) by name
    store.label(Ref("Namespace", "", "default"), {"istio.io/dataplane-mode": "ambient"}, remove=[])
    store.select("VirtualService", namespace="default")
    snap = store.snapshot(); unsubscribe = store.subscribe(callback)   # see controlplane.config.source

Every committed change increments one store-wide `version`; each resource changed by it carries that
number as `metadata.resourceVersion` (and `metadata.generation` counts its own changes).  An apply that
changes nothing (same content) commits nothing and notifies nobody.  A resource is given
`metadata.creationTimestamp` (RFC 3339, UTC, to the microsecond: two objects applied one after the other
are told apart, as Istio's "oldest wins" needs) and `metadata.uid` (a UUID) when it is created; both are
kept as they are on every update and label, and saved with it.  What a user writes in these four fields
is ignored, as the Kubernetes API server ignores it, except in a store that mirrors an API server
(`check_references=False`, the Kubernetes source): there a created object keeps the API server's own
`creationTimestamp` and `uid`.  A saved store from before these fields existed is given them once, at load.

Persistence: the whole state is one JSON file, `resources.json`, replaced atomically before the change
becomes visible in memory.  So a crash leaves either the old or the new state, never a mix, and a
failed write changes nothing.  (Rewriting the whole file costs a few milliseconds per thousand
resources, fine for the sizes here; a write-ahead log would be the next step.)

Thread-safe: one lock serializes writers; readers take a snapshot, which is immutable.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from controlplane.config.source import Callback, ChangeEvent, Snapshot
from mesh.api.crossref import ADVICE, check_subsets
from mesh.api.errors import ApiError, Conflict, FieldError, NotFound, ValidationError
from mesh.api.kinds import DEFAULT_NAMESPACE, ROOT_NAMESPACE, kind_info
from mesh.api.names import label_key_problem, label_value_problem
from mesh.api.validate import (
    Document,
    Ref,
    check_document,
    check_reference,
    label_semantics_problem,
    validate_documents,
)
from mesh.files import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "resources.json"
FORMAT = 1
_SERVER_FIELDS = ("resourceVersion", "generation", "creationTimestamp", "uid")
_ORIGIN_FIELDS = ("creationTimestamp", "uid")  # set once, when the resource is created


def timestamp(when: float) -> str:
    """`when` (seconds since the epoch) as a `creationTimestamp`: RFC 3339, UTC, microseconds."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Namespaces that exist without being applied, as on a new Kubernetes cluster with the mesh installed.
BUILTIN_NAMESPACES = frozenset({DEFAULT_NAMESPACE, "kube-system", "kube-public", "kube-node-lease", ROOT_NAMESPACE})


def missing_namespaces(state: Mapping[Ref, Any], batch: Mapping[Ref, Document]) -> list[FieldError]:
    """A namespaced resource of `batch` in a namespace that neither exists in `state` (which includes the
    batch: a Namespace may come with its contents) nor is built in: refused, as the API server refuses it."""
    return [batch[ref].locate([FieldError("metadata.namespace", f'namespaces "{ref.namespace}" not found')])[0]
            for ref in sorted(batch) if ref.namespace and ref.namespace not in BUILTIN_NAMESPACES
            and Ref("Namespace", "", ref.namespace) not in state]


class StoreError(ApiError):
    """The store's state directory could not be read or written."""


@dataclass(frozen=True)
class Outcome:
    ref: Ref
    action: str  # created, configured, unchanged, deleted, labeled

    def __str__(self) -> str:
        info = kind_info(self.ref.kind)
        display = info.display if info else self.ref.kind.lower()
        where = f" in {self.ref.namespace}" if self.ref.namespace else ""
        return f"{display}/{self.ref.name}{where} {self.action}"


@dataclass(frozen=True)
class Result:
    version: int
    outcomes: tuple[Outcome, ...]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version,
                "outcomes": [{"ref": str(o.ref), "action": o.action, "text": str(o)} for o in self.outcomes]}


class Store:
    """The configuration store.  `directory` None keeps everything in memory (tests, and the Kubernetes
    source, whose truth is the API server).  `check_references=False` leaves out the checks across
    documents (`mesh.api.crossref`): a source that mirrors the Kubernetes API cannot refuse a deletion
    that already happened, nor depend on the order in which it hears of objects."""

    def __init__(self, directory: Path | str | None = None, *, check_references: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(directory) if directory is not None else None
        self._check_references = check_references
        self._clock = clock
        self._lock = threading.RLock()
        self._subscribers: list[Callback] = []
        self._version = 0
        self._state: Mapping[Ref, dict[str, Any]] = MappingProxyType({})
        if self._dir is not None:
            self._load()

    # ---- reading ------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self._version, self._state)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call `callback(ChangeEvent)` after every committed change; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def select(self, kind: str | None = None, namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Bodies matching the filters, sorted.  Asking for one missing resource by name raises NotFound."""
        snap = self.snapshot()
        out = [body for ref, body in sorted(snap.resources.items())
               if (kind is None or ref.kind == kind) and (namespace is None or ref.namespace == namespace)
               and (name is None or ref.name == name)]
        if name is not None and not out:
            where = f" in namespace {namespace}" if namespace else ""
            raise NotFound(f"{kind or 'resource'} {name!r} not found{where}")
        return out

    # ---- writing ------------------------------------------------------------------------------------

    def apply(self, docs: Sequence[Document], default_namespace: str = DEFAULT_NAMESPACE) -> Result:
        """Create or replace every document's resource, or change nothing and raise ValidationError."""
        good, errors = validate_documents(docs, default_namespace)
        if errors:
            raise ValidationError(errors)
        with self._lock:
            old = self._state
            new = dict(old)
            batch: dict[Ref, Document] = {}
            outcomes = []
            changed = set()
            for doc, body in good:
                ref = Ref.of(body)
                batch[ref] = doc
                before = old.get(ref)
                if before is not None and _content(before) == _content(body):
                    outcomes.append(Outcome(ref, "unchanged"))
                    continue
                if before is None and not self._check_references:  # a mirror keeps the API server's
                    origin = doc.body.get("metadata") or {}
                    body["metadata"].update({k: origin[k] for k in _ORIGIN_FIELDS if isinstance(origin.get(k), str)})
                new[ref] = body
                changed.add(ref)
                outcomes.append(Outcome(ref, "configured" if before is not None else "created"))
            problems = missing_namespaces(new, batch) + check_subsets(new, old, batch) if self._check_references else []
            if problems:
                raise ValidationError(problems)
            return self._commit(new, changed, set(), outcomes)

    def delete(self, docs: Sequence[Document], default_namespace: str = DEFAULT_NAMESPACE,
               ignore_not_found: bool = False) -> Result:
        """Delete the resources the documents name (only their kind and metadata are read)."""
        refs: dict[Ref, Document] = {}
        errors: list[FieldError] = []
        for doc in docs:
            ref, errs = check_reference(doc.body, default_namespace)
            errors.extend(doc.locate(errs))
            if ref is not None:
                refs[ref] = doc
        if errors:
            raise ValidationError(errors)
        return self._delete(refs, ignore_not_found)

    def delete_refs(self, refs: Iterable[Ref], ignore_not_found: bool = False) -> Result:
        return self._delete({r: Document("", 0, {}) for r in refs}, ignore_not_found)

    def _delete(self, refs: Mapping[Ref, Document], ignore_not_found: bool) -> Result:
        with self._lock:
            old = self._state
            missing = [r for r in refs if r not in old]
            if missing and not ignore_not_found:
                errors = [refs[r].locate([FieldError("", f"{r} not found")])[0] for r in missing]
                if len(errors) == 1 and not refs[missing[0]].source:
                    raise NotFound(str(errors[0]))
                raise ValidationError(errors)
            new = {r: b for r, b in old.items() if r not in refs}
            problems = check_subsets(new, old, refs, deleting=True) if self._check_references else []
            if problems:
                if all(not refs[r].source for r in refs):
                    raise Conflict("; ".join(p.message.removesuffix(ADVICE) for p in problems) + ADVICE)
                raise ValidationError(problems)
            gone = {r for r in refs if r in old}
            outcomes = [Outcome(r, "deleted") for r in sorted(gone)]
            return self._commit(new, set(), gone, outcomes)

    def label(self, ref: Ref, set_labels: Mapping[str, str], remove: Iterable[str] = ()) -> Result:
        """Set and remove labels of one resource (like `kubectl label`); the result is validated again."""
        errors = []
        for key, value in set_labels.items():
            problem = label_key_problem(key) or label_value_problem(value) or label_semantics_problem(key, value)
            if problem:
                errors.append(FieldError(f'metadata.labels["{key}"]', problem))
        for key in remove:
            problem = label_key_problem(key)
            if problem:
                errors.append(FieldError(f'metadata.labels["{key}"]', problem))
        if errors:
            raise ValidationError(errors)
        with self._lock:
            body = self._state.get(ref)
            if body is None:
                raise NotFound(f"{ref} not found")
            updated = json.loads(json.dumps(body))
            current = updated["metadata"].setdefault("labels", {})
            for key in remove:
                current.pop(key, None)
            current.update(set_labels)
            if not current:
                del updated["metadata"]["labels"]
            checked, errs = check_document(updated, ref.namespace or DEFAULT_NAMESPACE)
            if errs or checked is None:
                raise ValidationError(errs)
            if _content(checked) == _content(body):
                return Result(self._version, (Outcome(ref, "unchanged"),))
            new = dict(self._state)
            new[ref] = checked
            return self._commit(new, {ref}, set(), [Outcome(ref, "labeled")])

    # ---- committing and persisting ------------------------------------------------------------------

    def _commit(self, new: dict[Ref, dict[str, Any]], changed: set[Ref], removed: set[Ref],
                outcomes: list[Outcome]) -> Result:
        if not changed and not removed:
            return Result(self._version, tuple(outcomes))
        version = self._version + 1
        now = self._clock()
        for ref in changed:
            before = self._state.get(ref)
            meta = new[ref]["metadata"]
            meta["resourceVersion"] = str(version)
            meta["generation"] = int((before or {}).get("metadata", {}).get("generation", 0)) + 1
            if before is not None:
                meta.update({k: v for k, v in before["metadata"].items() if k in _ORIGIN_FIELDS})
            _originate(meta, now)
        self._persist(version, new)
        self._version = version
        self._state = MappingProxyType(new)
        event = ChangeEvent(version, frozenset(changed), frozenset(removed))
        log.info("store version=%d changed=%d removed=%d %s", version, len(changed), len(removed),
                 " ".join(f"{o.ref}={o.action}" for o in outcomes))
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break the store
                log.exception("store subscriber failed")
        return Result(version, tuple(outcomes))

    def _persist(self, version: int, state: Mapping[Ref, dict[str, Any]]) -> None:
        if self._dir is None:
            return
        data = {"format": FORMAT, "version": version, "resources": [state[r] for r in sorted(state)]}
        try:
            write_atomic(self._dir / STATE_FILE, json.dumps(data, separators=(",", ":")).encode(), mode=0o600)
        except OSError as exc:
            raise StoreError(f"cannot save the configuration in {self._dir}: {exc}") from exc

    def _load(self) -> None:
        assert self._dir is not None
        path = self._dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: cannot read the saved configuration ({exc}); "
                             "move it away to start empty") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{path}: unknown format (expected format {FORMAT}); move it away to start empty")
        version, resources = data.get("version", 0), data.get("resources", [])
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise StoreError(f"{path}: 'version' must be a non-negative integer, not {version!r}; "
                             "move the file away to start empty")
        if not isinstance(resources, list):
            raise StoreError(f"{path}: 'resources' must be a list; move the file away to start empty")
        state: dict[Ref, dict[str, Any]] = {}
        for i, body in enumerate(resources):
            ref, body = _loaded(path, i, body)
            if ref in state:
                raise StoreError(f"{path}: resources[{i}]: {ref} is saved twice; move the file away to start empty")
            state[ref] = body
        now = self._clock()
        backfilled = [ref for ref, body in state.items() if _originate(body.setdefault("metadata", {}), now)]
        if backfilled:  # saved before creation times were kept: given one now, and saved at once
            try:
                self._persist(version, state)
            except StoreError as exc:
                log.warning("store: %s (the creation times given at this start are not saved)", exc)
            log.info("store: gave %d saved resources a creationTimestamp and uid", len(backfilled))
        self._version = version
        self._state = MappingProxyType(state)
        log.info("store loaded %d resources at version %d from %s", len(state), self._version, path)


def _loaded(path: Path, i: int, body: Any) -> tuple[Ref, dict[str, Any]]:
    """One saved resource: a `StoreError` naming the file and the entry if it names no resource; normalized
    (nulls dropped, as an apply does today) if it still validates, else kept as saved and reported
    (translation leaves out what it cannot serve, and says so: the control plane still starts)."""
    ref, errors = check_reference(body)
    if ref is None or not isinstance(body, dict):
        what = "; ".join(str(e) for e in errors) or "not a resource"
        raise StoreError(f"{path}: resources[{i}] is not a resource the store could have saved ({what}); "
                         "move the file away to start empty")
    checked, errors = check_document(body, ref.namespace or DEFAULT_NAMESPACE)
    if checked is None:
        log.warning("store: saved %s no longer validates (%s); kept as saved: what translation cannot serve "
                    "is left out and reported; apply a corrected version", ref, "; ".join(str(e) for e in errors))
        return ref, body
    saved_meta = body.get("metadata") or {}
    for key in _SERVER_FIELDS:
        if key in saved_meta:
            checked["metadata"][key] = saved_meta[key]
    return ref, checked


def _originate(meta: dict[str, Any], now: float) -> bool:
    """Give `meta` the creation fields it lacks; True if it lacked any."""
    missing = False
    if not isinstance(meta.get("creationTimestamp"), str):
        meta["creationTimestamp"] = timestamp(now)
        missing = True
    if not isinstance(meta.get("uid"), str):
        meta["uid"] = str(uuid.uuid4())
        missing = True
    return missing


def _content(body: Mapping[str, Any]) -> Any:
    """What a user wrote, without the fields the store sets, for 'unchanged' comparisons."""
    meta = {k: v for k, v in body.get("metadata", {}).items() if k not in _SERVER_FIELDS}
    return {**body, "metadata": meta}
