"""Validating one document, and the identity of a resource (`Ref`).

`check_document(body)` returns the resource's normalized body (namespace filled in) and every
`FieldError` found; `validate_documents(docs)` does that for a batch and locates each error
(`file:document N:path: message`).  Checks that need other documents are in `mesh.api.crossref`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mesh.api.errors import FieldError
from mesh.api.kinds import DEFAULT_NAMESPACE, KindInfo, kind_info, suggest_kind
from mesh.api.kinds_gateway import (
    DATAPLANE_MODE_LABEL,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_FOR_VALUES,
)
from mesh.api.names import dns1123_label_problem, metadata
from mesh.api.schema import Errors, Node, child, drop_nulls, type_name, unknown_field_message


@dataclass(frozen=True, order=True)
class Ref:
    """Which resource: kind, namespace ("" for cluster-scoped kinds) and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> Ref:
        parts = text.split("/")
        if len(parts) == 2:
            return cls(parts[0], "", parts[1])
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2])
        raise ValueError(f"bad resource reference {text!r}")

    @classmethod
    def of(cls, body: dict[str, Any]) -> Ref:
        meta = body.get("metadata") or {}
        return cls(str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))


@dataclass(frozen=True)
class Document:
    """One YAML document as read: where it came from (file name, 1-based index) and its content."""

    source: str
    index: int
    body: Any

    def locate(self, errors: Iterable[FieldError]) -> list[FieldError]:
        return [e.located(self.source, self.index) for e in errors]


_TOP = ("apiVersion", "kind", "metadata", "spec", "status")

# Values the mesh gives meaning to, checked wherever the label appears.
_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    DATAPLANE_MODE_LABEL: ("ambient", "none"),
    WAYPOINT_FOR_LABEL: WAYPOINT_FOR_VALUES,
}


def label_semantics_problem(key: str, value: str) -> str | None:
    """What is wrong with a mesh label's value (`istio.io/dataplane-mode=sidecar`), or None."""
    allowed = _LABEL_VALUES.get(key)
    if allowed is not None and value not in allowed:
        return f"{key} must be one of {', '.join(allowed)}, not {value!r}"
    if key in (USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL):
        problem = dns1123_label_problem(value)
        if problem:
            return f"{key} must name a waypoint Gateway: {problem}"
    return None


def check_document(body: Any, default_namespace: str = DEFAULT_NAMESPACE) -> tuple[dict[str, Any] | None, Errors]:
    """Validate one document.  Returns (normalized copy, errors); the copy is None when there are errors."""
    errors: Errors = []
    if not isinstance(body, dict):
        return None, [FieldError("", f"a document must be a mapping with apiVersion and kind, not {type_name(body)}")]
    info = _check_header(body, errors)
    if info is None:
        return None, errors
    for key in body:
        if key not in _TOP and key not in info.extra:
            errors.append(FieldError(str(key), unknown_field_message(str(key), list(_TOP) + list(info.extra))))
    meta = body.get("metadata")
    if meta is None:
        errors.append(FieldError("metadata.name", "is required"))
    else:
        metadata(info.name_check).check(meta, "metadata", errors)
        if isinstance(meta, dict):
            if not info.namespaced and meta.get("namespace"):
                errors.append(FieldError("metadata.namespace", f"must not be set: a {info.kind} belongs to no namespace"))
            for k, v in (meta.get("labels") or {}).items() if isinstance(meta.get("labels"), dict) else ():
                problem = label_semantics_problem(k, v) if isinstance(v, str) else None
                if problem:
                    errors.append(FieldError(child("metadata.labels", k), problem))
    _check_part(info, body, "spec", info.spec, errors)
    _check_part(info, body, "status", info.status, errors)
    for key, node in info.extra.items():
        if body.get(key) is not None:
            node.check(body[key], key, errors)
    if errors:
        return None, errors
    return normalize(body, info, default_namespace), []


def _check_header(body: dict[str, Any], errors: Errors) -> KindInfo | None:
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if api_version is None:
        errors.append(FieldError("apiVersion", "is required"))
    elif not isinstance(api_version, str):
        errors.append(FieldError("apiVersion", f"must be a string, not {type_name(api_version)}"))
    if kind is None:
        errors.append(FieldError("kind", "is required"))
        return None
    if not isinstance(kind, str):
        errors.append(FieldError("kind", f"must be a string, not {type_name(kind)}"))
        return None
    info = kind_info(kind)
    if info is None:
        errors.append(FieldError("kind", f"unknown kind {kind!r}{suggest_kind(kind)}"))
        return None
    if isinstance(api_version, str) and api_version not in info.api_versions:
        errors.append(FieldError("apiVersion", f"{api_version!r} is not an API version of {kind} "
                                               f"(use {' or '.join(info.api_versions)})"))
    return None if errors else info


def _check_part(info: KindInfo, body: dict[str, Any], part: str, node: Node | None, errors: Errors) -> None:
    value = body.get(part)
    if value is None:
        if part == "spec" and info.spec_required:
            errors.append(FieldError("spec", "is required"))
        return
    if node is None:
        errors.append(FieldError(part, f"a {info.kind} has no {part}"))
        return
    node.check(value, part, errors)


def normalize(body: dict[str, Any], info: KindInfo, default_namespace: str) -> dict[str, Any]:
    """A deep copy with the namespace filled in (namespaced kinds), server-set metadata removed, and no
    null fields at any depth (null means "not set": `schema.drop_nulls`)."""
    out: dict[str, Any] = drop_nulls(copy.deepcopy(body))
    meta = out.setdefault("metadata", {})
    if info.namespaced:
        meta["namespace"] = meta.get("namespace") or default_namespace
    for key in ("resourceVersion", "generation", "creationTimestamp", "uid"):
        meta.pop(key, None)
    for key in [k for k, v in out.items() if v is None]:
        del out[key]
    return out


def validate_documents(docs: Iterable[Document], default_namespace: str = DEFAULT_NAMESPACE) -> tuple[
        list[tuple[Document, dict[str, Any]]], list[FieldError]]:
    """Validate every document; returns the (document, normalized body) pairs and all located errors.
    The same resource twice in one batch is an error on its second occurrence."""
    good: list[tuple[Document, dict[str, Any]]] = []
    errors: list[FieldError] = []
    seen: dict[Ref, Document] = {}
    for doc in docs:
        body, errs = check_document(doc.body, default_namespace)
        if errs or body is None:
            errors.extend(doc.locate(errs))
            continue
        ref = Ref.of(body)
        if ref in seen:
            first = seen[ref]
            errors.extend(doc.locate([FieldError("metadata.name", f"{ref} is also defined in {first.source}:document {first.index}")]))
            continue
        seen[ref] = doc
        good.append((doc, body))
    return good, errors


def check_reference(body: Any, default_namespace: str = DEFAULT_NAMESPACE) -> tuple[Ref | None, Errors]:
    """Only what names a resource (apiVersion, kind, metadata.name/namespace): for deletion by file."""
    errors: Errors = []
    if not isinstance(body, dict):
        return None, [FieldError("", f"a document must be a mapping with apiVersion and kind, not {type_name(body)}")]
    info = _check_header(body, errors)
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        errors.append(FieldError("metadata.name", "is required"))
    if info is None or errors:
        return None, errors
    namespace = (meta or {}).get("namespace") or default_namespace if info.namespaced else ""
    return Ref(info.kind, str(namespace), str(name)), []
