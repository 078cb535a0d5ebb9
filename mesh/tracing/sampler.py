"""Sampling: parent-based, with the percentage Istio's `Telemetry` resource sets (pure).

    decide(parent, policy, default, rng)   the caller's decision when it gave one (a sampled incoming
                                           context is honoured, an unsampled one too), else a coin with
                                           the policy's percentage (else `default`: Istio's 1%)
    resolve(telemetries, namespace=, gateway=)   the `TracingPolicy` a proxy of `namespace` follows

`resolve` merges Istio's way, field by field, the most specific that sets a field winning:
root namespace (`istio-system`) without selector or targetRefs  <  the proxy's namespace without
selector or targetRefs  <  one whose `targetRefs` name the proxy's Gateway (a waypoint).  Of several at
one level, the first by name counts (Istio takes the oldest; the store keeps no creation time).  A
Telemetry with a `selector` selects workloads' sidecars, which this mesh has none of: no proxy here
applies it.  Of `tracing`, the first entry is read: `randomSamplingPercentage`, `disableSpanReporting`,
`customTags`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.defaults import ROOT_NAMESPACE
from mesh.tracing.context import Parent

DEFAULT_SAMPLING_PERCENT = 1.0  # Istio's default (meshConfig.defaultConfig.tracing.sampling)


@dataclass(frozen=True)
class CustomTag:
    """A span attribute a Telemetry asks for: a `literal` value, a request `header`'s value or an
    `environment` variable's (each with a default when the header or variable is missing)."""

    name: str
    kind: str  # literal | header | environment
    value: str  # the literal, or the header's or variable's name
    default: str = ""


@dataclass(frozen=True)
class TracingPolicy:
    """What tracing a proxy does.  `percentage` None: not set by any Telemetry (the process's default)."""

    percentage: float | None = None
    reporting: bool = True  # False: `disableSpanReporting`, spans are made (ids propagate) but not sent
    custom_tags: tuple[CustomTag, ...] = ()
    sources: tuple[str, ...] = ()  # the Telemetries that set it, "ns/name", for config dumps


@dataclass(frozen=True)
class TelemetryDoc:
    """One Telemetry as a proxy reads it."""

    namespace: str
    name: str
    spec: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def namespace_wide(self) -> bool:
        return not (self.spec.get("selector") or self.spec.get("targetRef") or self.spec.get("targetRefs"))

    def targets_gateway(self, namespace: str, gateway: str) -> bool:
        refs = list(self.spec.get("targetRefs") or []) + ([self.spec["targetRef"]] if self.spec.get("targetRef") else [])
        for ref in refs:
            ns = ref.get("namespace") or self.namespace
            if ref.get("kind") == "Gateway" and ref.get("name") == gateway and ns == namespace and \
                    (ns == self.namespace or self.namespace == ROOT_NAMESPACE):
                return True
        return False


def decide(parent: Parent, policy: TracingPolicy, default: float = DEFAULT_SAMPLING_PERCENT,
           rng: random.Random | None = None) -> bool:
    """Sample this request?  The caller's decision when it made one, else the policy's percentage."""
    if parent.sampled is not None:
        return parent.sampled
    percentage = policy.percentage if policy.percentage is not None else default
    if percentage >= 100.0:
        return True
    if percentage <= 0.0:
        return False
    return (rng or random).random() * 100.0 < percentage


def _tags(raw: Mapping[str, Any]) -> tuple[CustomTag, ...]:
    out = []
    for name, tag in sorted(raw.items()):
        if "literal" in tag:
            out.append(CustomTag(name, "literal", str(tag["literal"].get("value", ""))))
        elif "header" in tag:
            out.append(CustomTag(name, "header", str(tag["header"]["name"]).lower(),
                                 str(tag["header"].get("defaultValue", ""))))
        elif "environment" in tag:
            out.append(CustomTag(name, "environment", str(tag["environment"]["name"]),
                                 str(tag["environment"].get("defaultValue", ""))))
    return tuple(out)


def _merge(policy: TracingPolicy, doc: TelemetryDoc) -> TracingPolicy:
    entries = doc.spec.get("tracing") or []
    if not entries:
        return policy
    entry = entries[0]
    out = policy
    if entry.get("randomSamplingPercentage") is not None:
        out = replace(out, percentage=float(entry["randomSamplingPercentage"]))
    if entry.get("disableSpanReporting") is not None:
        out = replace(out, reporting=not entry["disableSpanReporting"])
    if entry.get("customTags"):
        out = replace(out, custom_tags=_tags(entry["customTags"]))
    return replace(out, sources=(*out.sources, doc.ref))


def levels(telemetries: Iterable[TelemetryDoc], *, namespace: str, gateway: str = "") -> list[list[TelemetryDoc]]:
    """The Telemetries that apply to a proxy in `namespace` (a waypoint: also its Gateway's name), least
    specific level first (the root namespace's, the namespace's own, those naming the Gateway); within a
    level by name, the first one counting."""
    docs = sorted(telemetries, key=lambda d: (d.name, d.namespace))
    return [
        [d for d in docs if d.namespace == ROOT_NAMESPACE and d.namespace_wide],
        [d for d in docs if d.namespace == namespace and d.namespace_wide and namespace != ROOT_NAMESPACE],
        [d for d in docs if gateway and d.targets_gateway(namespace, gateway)],
    ]


def resolve(telemetries: Iterable[TelemetryDoc], *, namespace: str, gateway: str = "") -> TracingPolicy:
    """The tracing policy of a proxy in `namespace` (a waypoint: also its Gateway's name)."""
    policy = TracingPolicy()
    for level in levels(telemetries, namespace=namespace, gateway=gateway):
        if level:
            policy = _merge(policy, level[0])
    return policy
