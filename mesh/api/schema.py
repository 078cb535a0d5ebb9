"""A small declarative schema language for strict validation of YAML/JSON documents.

A schema is a tree of `Node`s; `node.check(value, path, errors)` appends one `FieldError` per mistake
(it never raises), so a document reports all of its mistakes at once.  Paths are written the way users
read them: `spec.http[0].route[1].weight`, map keys as `.key`, or `["key"]` when the key has a dot or a
slash (`metadata.labels["istio.io/rev"]`).

Objects are strict: an unknown field is an error that names the closest known field, if any.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.api.errors import FieldError

Errors = list[FieldError]
Check = Callable[[Any, str, Errors], None]

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def child(path: str, key: str | int) -> str:
    """The path of `key` under `path`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f'{path}["{key}"]'


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _wrong_type(expected: str, value: Any, path: str, errors: Errors) -> None:
    errors.append(FieldError(path, f"must be {expected}, not {type_name(value)} {_short(value)}"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Node:
    """A schema node.  `describe` is what the node expects, used in type errors."""

    describe = "a value"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        raise NotImplementedError


@dataclass
class AnyValue(Node):
    """Anything (used for fields carried through untouched, such as `status`)."""

    def check(self, value: Any, path: str, errors: Errors) -> None:
        return


@dataclass
class Str(Node):
    """A string, optionally matching `pattern` (with `hint` saying what is allowed) and `checks`."""

    pattern: str | None = None
    hint: str = ""
    nonempty: bool = False
    max_len: int | None = None
    checks: Sequence[Check] = ()
    describe = "a string"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, str):
            _wrong_type("a string", value, path, errors)
            return
        if self.nonempty and not value:
            errors.append(FieldError(path, "must not be empty"))
            return
        if self.max_len is not None and len(value) > self.max_len:
            errors.append(FieldError(path, f"is {len(value)} characters long, at most {self.max_len} allowed"))
            return
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            errors.append(FieldError(path, f"{value!r} is not valid: {self.hint or 'must match ' + self.pattern}"))
            return
        for c in self.checks:
            c(value, path, errors)


@dataclass
class Int(Node):
    minimum: int | None = None
    maximum: int | None = None
    describe = "an integer"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong_type("an integer", value, path, errors)
            return
        _range(value, self.minimum, self.maximum, path, errors)


@dataclass
class Number(Node):
    minimum: float | None = None
    maximum: float | None = None
    describe = "a number"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _wrong_type("a number", value, path, errors)
            return
        _range(value, self.minimum, self.maximum, path, errors)


def _range(value: float, lo: float | None, hi: float | None, path: str, errors: Errors) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        errors.append(FieldError(path, f"{value} is out of range: must be between {lo} and {hi}"))
    elif lo is not None and value < lo:
        errors.append(FieldError(path, f"{value} is out of range: must be at least {lo}"))
    elif hi is not None and value > hi:
        errors.append(FieldError(path, f"{value} is out of range: must be at most {hi}"))


@dataclass
class Bool(Node):
    describe = "a boolean"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, bool):
            _wrong_type("a boolean (true or false)", value, path, errors)


@dataclass
class Enum(Node):
    values: Sequence[str] = ()
    describe = "one of a fixed set of words"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, str):
            _wrong_type("a string", value, path, errors)
            return
        if value not in self.values:
            close = difflib.get_close_matches(value.upper(), [v.upper() for v in self.values], n=1)
            hint = ""
            if close:
                hint = f" (did you mean {next(v for v in self.values if v.upper() == close[0])}?)"
            errors.append(FieldError(path, f"{value!r} is not one of {', '.join(self.values)}{hint}"))


@dataclass
class IntOrStr(Node):
    """An integer, or a string accepted by `as_str` (Kubernetes' IntOrString)."""

    as_int: Node = field(default_factory=Int)
    as_str: Node = field(default_factory=Str)

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            self.as_int.check(value, path, errors)
        elif isinstance(value, str):
            self.as_str.check(value, path, errors)
        else:
            _wrong_type("an integer or a string", value, path, errors)


@dataclass
class ListOf(Node):
    item: Node
    min_items: int = 0
    unique: bool = False
    describe = "a list"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, list):
            _wrong_type("a list", value, path, errors)
            return
        if len(value) < self.min_items:
            errors.append(FieldError(path, f"must have at least {self.min_items} item{'s' * (self.min_items > 1)}"))
        seen: set[Any] = set()
        for i, item in enumerate(value):
            self.item.check(item, child(path, i), errors)
            if self.unique and isinstance(item, (str, int)):
                if item in seen:
                    errors.append(FieldError(child(path, i), f"{item!r} is listed twice"))
                seen.add(item)


@dataclass
class MapOf(Node):
    """A mapping with string keys checked by `key` and values checked by `value`."""

    value: Node
    key: Check | None = None
    int_keys: bool = False  # YAML reads `8080:` as an integer key (Istio's map<uint32, ...>)
    describe = "a mapping"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, dict):
            _wrong_type("a mapping", value, path, errors)
            return
        for k, v in value.items():
            p = child(path, str(k))
            if self.int_keys and isinstance(k, int) and not isinstance(k, bool):
                k = str(k)
            if not isinstance(k, str):
                errors.append(FieldError(p, f"key must be a string, not {type_name(k)}"))
                continue
            if self.key is not None:
                self.key(k, p, errors)
            self.value.check(v, p, errors)


@dataclass
class Obj(Node):
    """A mapping with known fields.  `required` must be present; of each group in `one_of` at most one
    may be set (exactly one when `exactly_one` is set); `checks` run when all fields are well-typed."""

    fields: Mapping[str, Node]
    required: Sequence[str] = ()
    one_of: Sequence[Sequence[str]] = ()
    exactly_one: bool = False
    checks: Sequence[Check] = ()
    describe = "a mapping"

    def check(self, value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, dict):
            _wrong_type("a mapping", value, path, errors)
            return
        before = len(errors)
        for k, v in value.items():
            p = child(path, str(k))
            node = self.fields.get(k) if isinstance(k, str) else None
            if node is None:
                errors.append(FieldError(p, unknown_field_message(str(k), self.fields)))
                continue
            if v is None and not isinstance(node, AnyValue):
                continue  # YAML `field:` with nothing after it means "not set", as in Kubernetes
            node.check(v, p, errors)
        for name in self.required:
            if value.get(name) is None:
                errors.append(FieldError(child(path, name), "is required"))
        for group in self.one_of:
            present = [g for g in group if value.get(g) is not None]
            if len(present) > 1:
                errors.append(FieldError(path, f"set only one of {', '.join(group)} (found {', '.join(present)})"))
            elif not present and self.exactly_one:
                errors.append(FieldError(path, f"must set one of {', '.join(group)}"))
        if len(errors) == before:
            for c in self.checks:
                c(value, path, errors)


def drop_nulls(value: Any) -> Any:
    """`value` without the null fields of its mappings, at any depth: null means "not set", as in Istio
    (a Kubernetes structural schema prunes such fields, protobuf JSON reads them as the default).  `Obj`
    skips them when checking, so what is stored and translated, and what a waypoint compiles, never
    holds them.  (A null inside a list, or as a map's value, is refused by the schema, not dropped.)"""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def unknown_field_message(name: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        hit = lowered.get(name.lower().replace("_", ""))
        close = [hit] if hit else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown field {name!r}{hint}"


# ---- value checks shared by the kinds ---------------------------------------------------------------

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:h|m|s|ms|us|µs|ns))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float:
    """Seconds in an Istio duration such as `2s`, `100ms`, `1.5s`, `1m`, `1h30m`; ValueError if bad."""
    if not isinstance(text, str) or not _DURATION.match(text):
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def check_duration(value: Any, path: str, errors: Errors) -> None:
    try:
        parse_duration(value)
    except ValueError:
        errors.append(FieldError(path, f"{value!r} is not a duration: write a number and a unit, like 2s, 100ms, 1.5s or 1m"))


def check_positive_duration(value: Any, path: str, errors: Errors) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        check_duration(value, path, errors)
        return
    if seconds < 1e-3:
        errors.append(FieldError(path, f"{value!r} is too short: must be at least 1ms"))


def check_regex(value: Any, path: str, errors: Errors) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        errors.append(FieldError(path, f"{value!r} is not a valid regular expression: {exc}"))


def check_cidr(value: Any, path: str, errors: Errors) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        errors.append(FieldError(path, f"{value!r} is not an IP address or CIDR (like 10.0.0.0/8 or 10.1.2.3)"))


def check_ip(value: Any, path: str, errors: Errors) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        errors.append(FieldError(path, f"{value!r} is not an IP address"))


def check_port_string(value: Any, path: str, errors: Errors) -> None:
    if not (value.isdigit() and 1 <= int(value) <= 65535):
        errors.append(FieldError(path, f"{value!r} is not a port number (1-65535)"))


def duration() -> Str:
    return Str(checks=[check_duration])


def positive_duration() -> Str:
    return Str(checks=[check_positive_duration])


def cidr() -> Str:
    return Str(checks=[check_cidr])


def port() -> Int:
    return Int(1, 65535)


def strings(min_items: int = 0, item: Node | None = None) -> ListOf:
    return ListOf(item or Str(nonempty=True), min_items=min_items)


def percent_double() -> Number:
    return Number(0, 100)


_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$")


def check_dns1123_label_or_wildcard_host(value: Any, path: str, errors: Errors) -> None:
    """A hostname such as `reviews`, `reviews.default.svc.cluster.local`, `*.example.com` or `*`."""
    if value == "*":
        return
    name = value[2:] if value.startswith("*.") else value
    if len(name) > 253 or not all(_HOST_LABEL.match(part) for part in name.split(".")):
        errors.append(FieldError(path, f"{value!r} is not a valid host: use a DNS name such as reviews, "
                                       "reviews.default.svc.cluster.local or *.example.com"))
