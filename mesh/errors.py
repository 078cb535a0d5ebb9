"""The root of the project's error hierarchy.

Every package derives its own errors from `MeshError`; the CLI prints a `MeshError` as one line
(its message says what is wrong and, where it can, what to do) and exits with status 1, so a user
never sees a bare traceback for bad input.
"""

from __future__ import annotations


class MeshError(Exception):
    """An error a user can act on; `str()` is the whole message."""


class UsageError(MeshError):
    """Bad command-line arguments."""
