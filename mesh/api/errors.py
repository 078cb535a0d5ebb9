"""Errors of the configuration model: one `FieldError` per mistake, gathered into a `ValidationError`.

A field error names the exact field (`spec.http[0].route[1].weight`) and says what is wrong; once the
document it came from is known, it reads `file:document N:spec.http[0].route[1].weight: what is wrong`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh.errors import MeshError


class ApiError(MeshError):
    """Any error of the configuration API (bad documents, unreachable control plane, refused requests)."""


@dataclass(frozen=True)
class FieldError:
    """One mistake in one document.  `source` is the file name (or "-" for stdin), `document` 1-based."""

    path: str
    message: str
    source: str = ""
    document: int = 0

    def located(self, source: str, document: int) -> FieldError:
        return FieldError(self.path, self.message, source, document)

    def __str__(self) -> str:
        where = []
        if self.source:
            where.append(self.source)
        if self.document:
            where.append(f"document {self.document}")
        if self.path:
            where.append(self.path)
        return ":".join(where) + (": " if where else "") + self.message


class ValidationError(ApiError):
    """Documents were refused; `errors` lists every mistake found (nothing was changed)."""

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors: tuple[FieldError, ...] = tuple(errors)
        first = str(self.errors[0]) if self.errors else "invalid configuration"
        more = len(self.errors) - 1
        super().__init__(first + (f" (and {more} more error{'s' if more > 1 else ''})" if more > 0 else ""))

    def lines(self) -> list[str]:
        return [str(e) for e in self.errors]


class BadRequest(ApiError):
    """A request to the apply API that is malformed in itself (not the documents it carries): 400."""


class NotFound(ApiError):
    """A resource that does not exist was asked for."""


class Conflict(ApiError):
    """A change that would leave the configuration inconsistent (e.g. deleting a subset still in use)."""
