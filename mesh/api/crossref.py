"""Checks across documents: every subset a VirtualService names must be defined by a DestinationRule.

The check runs on the state an apply (or delete) would produce: the store's resources plus the batch.
A batch is refused when
- one of its VirtualServices names a subset no DestinationRule for that host defines, or
- one of its DestinationRules (changed or deleted) stops defining a subset that a VirtualService still
  names: deleting `reviews`' DestinationRule while a VirtualService routes to `reviews` `v2` would break
  routing, so it is refused until the VirtualService is changed or deleted first (or in the same batch).
Breakage that the batch did not cause (say, state written by an older version) is not blamed on it.

Hosts are compared fully qualified: a short name `reviews` in namespace `default` means
`reviews.default.svc.cluster.local`; a DestinationRule host `*.example.com` covers `a.example.com`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from mesh import defaults
from mesh.api.errors import FieldError
from mesh.api.validate import Document, Ref

CLUSTER_DOMAIN = defaults.CLUSTER_DOMAIN

State = Mapping[Ref, dict[str, Any]]
ADVICE = ": change or delete the VirtualService first"


def fqdn(host: str, namespace: str) -> str:
    """`reviews` in `default` -> `reviews.default.svc.cluster.local`; names with a dot stay as written."""
    if "." in host or host == "*" or not namespace:
        return host.lower()
    return f"{host}.{namespace}.{CLUSTER_DOMAIN}".lower()


def host_covers(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def subset_refs(body: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(field path, fully qualified host, subset) for every destination with a subset in a VirtualService."""
    ns = body["metadata"].get("namespace", "")
    spec = body.get("spec") or {}
    for section in ("http", "tcp", "tls"):
        for i, route in enumerate(spec.get(section) or []):
            base = f"spec.{section}[{i}]"
            for j, dest in enumerate(route.get("route") or []):
                yield from _one(f"{base}.route[{j}].destination", dest.get("destination"), ns)
            yield from _one(f"{base}.mirror", route.get("mirror"), ns)
            for j, mirror in enumerate(route.get("mirrors") or []):
                yield from _one(f"{base}.mirrors[{j}].destination", mirror.get("destination"), ns)


def _one(path: str, dest: Any, ns: str) -> Iterator[tuple[str, str, str]]:
    if isinstance(dest, dict) and dest.get("subset"):
        yield f"{path}.subset", fqdn(dest["host"], ns), dest["subset"]


def subsets_for(state: State, host: str) -> dict[str, list[Ref]]:
    """Subset name -> the DestinationRules that define it for `host`."""
    out: dict[str, list[Ref]] = {}
    for ref, body in state.items():
        if ref.kind != "DestinationRule":
            continue
        spec = body.get("spec") or {}
        if not host_covers(fqdn(spec.get("host", ""), ref.namespace), host):
            continue
        for subset in spec.get("subsets") or []:
            out.setdefault(subset["name"], []).append(ref)
    return out


def check_subsets(new: State, old: State, batch: Mapping[Ref, Document], deleting: bool = False) -> list[FieldError]:
    """Errors (located at the documents of `batch`) for subset references the change would leave dangling."""
    errors: list[FieldError] = []
    for ref, body in sorted(new.items()):
        if ref.kind != "VirtualService":
            continue
        for path, host, subset in subset_refs(body):
            defined = subsets_for(new, host)
            if subset in defined:
                continue
            if ref in batch:
                known = ", ".join(sorted(defined)) or "none"
                errors.append(batch[ref].locate([FieldError(
                    path, f"subset {subset!r} of host {host} is not defined by any DestinationRule (defined: {known})")])[0])
                continue
            for dr in subsets_for(old, host).get(subset, []):
                if dr in batch:
                    errors.append(batch[dr].locate([FieldError(
                        "" if deleting else "spec.subsets",
                        f"subset {subset!r} of {host} is still used by VirtualService {ref.namespace}/{ref.name} "
                        f"({path}){ADVICE}")])[0])
    return _dedupe(errors)


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[str] = set()
    out = []
    for e in errors:
        if str(e) not in seen:
            seen.add(str(e))
            out.append(e)
    return out
