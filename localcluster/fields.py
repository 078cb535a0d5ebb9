"""Reading one YAML document field by field, recording every problem with where it is
(`file:document N:field: what is wrong`), so a file reports all its problems at once."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class Doc:
    """Reads one document, recording each problem with its location."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{self.where}:{path}: {message}" if path else f"{self.where}: {message}")

    def mapping(self, value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {kind_of(value)}")
            return {}
        allowed = set(allowed)
        for key in value:
            if key not in allowed:
                self.error(join(path, str(key)), f"unknown field (allowed: {', '.join(sorted(allowed))})")
        for key in required:
            if value.get(key) in (None, "", [], {}):
                self.error(join(path, key), "is required")
        return {k: v for k, v in value.items() if k in allowed}

    def string(self, value: Any, path: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            self.error(path, f"must be a string, not {kind_of(value)}")
            return ""
        if pattern is not None and not pattern.match(value):
            self.error(path, f"{value!r} is not a valid {what}")
            return ""
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer from {low} to {high}, not {kind_of(value)} {value!r}")
            return None
        if not low <= value <= high:
            self.error(path, f"{value} is out of range ({low}-{high})")
            return None
        return value

    def labels(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping of label names to values, not {kind_of(value)}")
            return {}
        out: dict[str, str] = {}
        for key, val in value.items():
            name = str(key).rsplit("/", 1)[-1]
            if not isinstance(key, str) or len(name) > 63 or not LABEL_NAME.match(name):
                self.error(join(path, str(key)), "is not a valid label name")
                continue
            if not isinstance(val, str) or len(val) > 63 or not LABEL_VALUE.match(val):
                self.error(join(path, key), f"label value {val!r} must be a string of at most 63 characters "
                           "([A-Za-z0-9._-], starting and ending alphanumeric)")
                continue
            out[key] = val
        return out

    def network(self, value: Any, path: str) -> ipaddress.IPv4Network | None:
        if not isinstance(value, str):
            self.error(path, f"must be an IPv4 CIDR such as 10.244.1.0/24, not {kind_of(value)}")
            return None
        try:
            net = ipaddress.IPv4Network(value, strict=True)
        except ValueError as exc:
            self.error(path, f"{value!r} is not a valid IPv4 CIDR ({exc})")
            return None
        if net.prefixlen > 28:
            self.error(path, f"{value} is too small: use a /28 or larger")
            return None
        return net


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind_of(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)
