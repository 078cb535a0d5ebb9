"""A memo of at most `size` entries, emptied when full: for values derived from a key on the data path
(metric label sets, resolved clusters, upstream protocols) whose keys are usually few but, coming partly
from requests (a Host header's port, a peer's address), must not grow without bound.

A `dict` itself, so that a hit costs what `dict.get` costs; `keep` is the only way in.  Emptying it whole
when full (rather than evicting one entry) keeps a hit free of bookkeeping: the few keys in use come back
at once.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(dict[K, V]):
    """A `dict` of at most `size` entries, emptied when a new key would pass that."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: K, value: V) -> V:
        """Remember `value` for `key` (emptying the memo first when it is full); `value` back."""
        if len(self) >= self.size and key not in self:
            self.clear()
        self[key] = value
        return value
