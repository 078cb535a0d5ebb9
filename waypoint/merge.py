"""One waypoint's metrics from the expositions of its worker processes (`waypoint.workers`), pure.

Prometheus scrapes the primary's :15020 and must see one waypoint with the metric names it always had, so
the primary reads every worker's Prometheus text and adds up what the workers count:

    counters, histogram buckets, _sum and _count     summed: samples with the same name and labels
    gauges                                          summed (open tunnels, connections: the waypoint's
                                                    total), except `LOWEST_GAUGES`, where the least is
                                                    the waypoint's truth: discovery connected only if
                                                    every worker is, the configuration version of the
                                                    worker furthest behind, the certificate that
                                                    expires first
    *_created                                       the earliest (when the first worker began counting)

A worker's text that cannot be read is left out whole (never half of it), with an error naming the worker
and what is wrong, and the others are merged as before.  A family a worker reports with another type than
the others is left out of that worker's contribution, with an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mesh.errors import MeshError

LOWEST_GAUGES = frozenset({"waypoint_xds_connected", "waypoint_config_version", "waypoint_certificate_expiry_seconds"})
CREATED_SUFFIX = "_created"


class MergeError(MeshError):
    """A worker's metrics that cannot be read."""


def parse(source: str, text: str) -> list[Metric]:
    """The families of one exposition, read whole; `MergeError` naming `source` and the fault."""
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise MergeError(f"metrics of {source} cannot be read: {exc}") from None
    return families


def _lowest(family: Metric) -> bool:
    return family.name in LOWEST_GAUGES or (family.type == "gauge" and family.name.endswith(CREATED_SUFFIX))


@dataclass
class Merged:
    families: list[Metric] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one per worker (or family) left out, saying why
    merged: list[str] = field(default_factory=list)  # the sources whose metrics are in

    def text(self, extra: Iterable[Metric] = ()) -> bytes:
        """Prometheus text of the merged families, then `extra`."""
        registry = CollectorRegistry(auto_describe=False)
        families = [*self.families, *extra]

        class Fixed:
            def collect(self) -> list[Metric]:
                return families

        registry.register(Fixed())  # type: ignore[arg-type]  # a collector is anything with collect()
        return generate_latest(registry)


def merge(parsed: Sequence[tuple[str, list[Metric]]]) -> Merged:
    """The families of several sources (already `parse`d) as one: see the module docstring."""
    out = Merged()
    kinds: dict[str, Metric] = {}  # family name -> its first (name, documentation, type)
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for source, families in parsed:
        for family in families:
            first = kinds.get(family.name)
            if first is None:
                first = kinds[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            elif first.type != family.type:
                out.errors.append(f"metrics of {source}: {family.name} is a {family.type}, elsewhere a {first.type}: "
                                  "left out")
                continue
            lowest = _lowest(family)
            into = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                have = into.get(key)
                if have is None:
                    into[key] = sample.value
                else:
                    into[key] = min(have, sample.value) if lowest else have + sample.value
        out.merged.append(source)
    for name, first in kinds.items():
        for (sample_name, labels), value in values[name].items():
            first.add_sample(sample_name, dict(labels), value)
        out.families.append(first)
    return out


def merge_texts(texts: Sequence[tuple[str, str]]) -> Merged:
    """`merge` of Prometheus texts by source; a text that cannot be read is left out with its error."""
    parsed: list[tuple[str, list[Metric]]] = []
    errors: list[str] = []
    for source, text in texts:
        try:
            parsed.append((source, parse(source, text)))
        except MergeError as exc:
            errors.append(str(exc))
    out = merge(parsed)
    out.errors[:0] = errors
    return out


def total(families: Iterable[Metric], sample_name: str) -> float:
    """The sum of every sample called `sample_name` (e.g. istio_requests_total) in `families`."""
    return sum(s.value for f in families for s in f.samples if s.name == sample_name)


def per_source(name: str, documentation: str, kind: str, label: str, values: Mapping[str, float]) -> Metric:
    """A family with one sample per source, labelled `label`=source (e.g. worker="1")."""
    family = Metric(name, documentation, kind)
    sample = name + "_total" if kind == "counter" else name
    for source, value in values.items():
        family.add_sample(sample, {label: source}, value)
    return family
