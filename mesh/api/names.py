"""Kubernetes naming rules: DNS-1123 names, label keys and values, and the `metadata` block."""

from __future__ import annotations

import re
from typing import Any

from mesh.api.errors import FieldError
from mesh.api.schema import AnyValue, Errors, Int, ListOf, MapOf, Obj, Str

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def dns1123_label_problem(value: str) -> str | None:
    if len(value) > 63:
        return f"{value!r} is longer than 63 characters"
    if not _DNS1123_LABEL.match(value):
        return f"{value!r} is not a DNS-1123 label: use lower-case letters, digits and '-', starting and ending with a letter or digit"
    return None


def dns1123_subdomain_problem(value: str) -> str | None:
    if len(value) > 253:
        return f"{value!r} is longer than 253 characters"
    if not _DNS1123_SUBDOMAIN.match(value):
        return f"{value!r} is not a DNS-1123 name: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
    return None


def label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or dns1123_subdomain_problem(prefix)):
        return f"label key {key!r} has a bad prefix: it must be a DNS-1123 subdomain such as example.com"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (f"label key {key!r} is not valid: the name part must be 1-63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def label_value_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"label value must be a string, not {type(value).__name__} (quote it in YAML)"
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (f"label value {value!r} is not valid: at most 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def check_label_key(value: str, path: str, errors: Errors) -> None:
    problem = label_key_problem(value)
    if problem:
        errors.append(FieldError(path, problem))


class LabelValue(Str):
    def check(self, value: Any, path: str, errors: Errors) -> None:
        problem = label_value_problem(value)
        if problem:
            errors.append(FieldError(path, problem))


def labels() -> MapOf:
    return MapOf(LabelValue(), key=check_label_key)


def check_dns1123_label(value: str, path: str, errors: Errors) -> None:
    problem = dns1123_label_problem(value)
    if problem:
        errors.append(FieldError(path, problem))


def check_dns1123_subdomain(value: str, path: str, errors: Errors) -> None:
    problem = dns1123_subdomain_problem(value)
    if problem:
        errors.append(FieldError(path, problem))


def label_selector() -> Obj:
    """Istio's `selector: {matchLabels: {...}}` (WorkloadSelector)."""
    return Obj({"matchLabels": labels()})


def metadata(name_check: Any = check_dns1123_subdomain) -> Obj:
    """The `metadata` block: name (required), namespace, labels, annotations and server-set fields."""
    return Obj(
        {
            "name": Str(nonempty=True, checks=[name_check]),
            "namespace": Str(nonempty=True, checks=[check_dns1123_label]),
            "labels": labels(),
            "annotations": MapOf(Str(), key=check_label_key),
            "uid": Str(),
            "resourceVersion": Str(),
            "generation": Int(0),
            "creationTimestamp": AnyValue(),
            "finalizers": ListOf(Str()),
            "ownerReferences": ListOf(AnyValue()),
        },
        required=["name"],
    )
