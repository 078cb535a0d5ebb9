"""Translation is total: one resource that cannot be translated is left out and reported, never the end
of translation (and so of discovery, or of the control plane's start).

Documents reach translation validated (`mesh.api.validate`), so a failure here is a disagreement between
the validator and translation, or a document saved by an older version that validated differently.
Either way the other resources must still be served.  Each builder runs its per-resource step through
`guarded(body, errors, step, *args)`, which turns an exception into one line in `errors`:

    AuthorizationPolicy bookinfo/deny: cannot be translated (KeyError: 'x'): left out; everything else is served
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def describe(body: Any) -> str:
    """`Kind namespace/name` of a body, as well as it can be told."""
    if not isinstance(body, Mapping):
        return f"a {type(body).__name__} where a resource was expected"
    meta = body.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    where = "/".join(str(p) for p in (meta.get("namespace"), meta.get("name")) if p)
    return f"{body.get('kind', 'resource')} {where or '(unnamed)'}"


def guarded(body: Any, errors: list[str], step: Callable[..., T], *args: Any) -> T | None:
    """`step(*args)`, or None with a line in `errors` naming `body` when it raises."""
    try:
        return step(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of one resource is that resource's alone
        errors.append(f"{describe(body)}: cannot be translated ({type(exc).__name__}: {exc}): left out; "
                      "everything else is served")
        return None
