"""Label selectors as `kubectl get -l` takes them: `app=reviews,version!=v1`, `app`, `!canary`,
`version in (v1,v2)`, `version notin (v3)`.  Pure: parsed once, matched against a labels mapping."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import UsageError

_SET = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^()]*)\)\s*$")
_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9./_-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        if self.op in ("=", "in"):
            return value in self.values
        return value not in self.values  # != and notin: also true when the label is absent


def _split(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _key(key: str, text: str) -> str:
    if not _KEY.match(key):
        raise UsageError(f"selector {text!r}: {key!r} is not a label key")
    return key


def parse(text: str) -> tuple[Requirement, ...]:
    """The requirements of a selector (all must hold); UsageError naming the part that is wrong."""
    reqs = []
    for part in _split(text):
        item = part.strip()
        if not item:
            raise UsageError(f"selector {text!r}: an empty requirement (two commas, or one at an end)")
        if m := _SET.match(item):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            if not values:
                raise UsageError(f"selector {text!r}: {item!r} lists no values")
            reqs.append(Requirement(_key(m.group(1), text), m.group(2), values))
        elif "!=" in item:
            key, _, value = item.partition("!=")
            reqs.append(Requirement(_key(key.strip(), text), "!=", frozenset([value.strip()])))
        elif "=" in item:
            key, _, value = item.partition("==" if "==" in item else "=")
            reqs.append(Requirement(_key(key.strip(), text), "=", frozenset([value.strip()])))
        elif item.startswith("!"):
            reqs.append(Requirement(_key(item[1:].strip(), text), "!exists"))
        else:
            reqs.append(Requirement(_key(item, text), "exists"))
    return tuple(reqs)


def matches(reqs: tuple[Requirement, ...], labels: Mapping[str, str] | None) -> bool:
    return all(r.matches(labels or {}) for r in reqs)
