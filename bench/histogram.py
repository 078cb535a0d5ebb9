"""A latency histogram in the manner of HdrHistogram: log-linear buckets, bounded relative error, mergeable.

Values are integer microseconds.  Below `2**bits` every value has its own bucket (exact); above, each
power-of-two range is cut into `2**(bits-1)` equal buckets, so a bucket is never wider than
`1 / 2**(bits-1)` of the values it holds (0.2 % with the default 10 bits).  A percentile is reported as
the highest value its bucket can hold, as HdrHistogram does, so a figure is never flattering.

Counts are kept sparse (bucket index -> count): histograms from several processes or rounds merge by
adding counts, and serialise to JSON as `[[index, count], ...]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BITS = 10
STANDARD_PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)


def bucket_index(value: int, bits: int = DEFAULT_BITS) -> int:
    """The bucket a non-negative integer value falls into."""
    if value < 0:
        raise ValueError(f"histogram values are non-negative, got {value}")
    if value < (1 << bits):
        return value
    shift = value.bit_length() - bits
    return (shift << (bits - 1)) + (value >> shift)


def bucket_bounds(index: int, bits: int = DEFAULT_BITS) -> tuple[int, int]:
    """The lowest and highest value that map to bucket `index` (inclusive)."""
    if index < (1 << bits):
        return index, index
    half = 1 << (bits - 1)
    shift = index // half - 1
    mantissa = index - shift * half
    return mantissa << shift, ((mantissa + 1) << shift) - 1


def nearest_rank(count: int, percentile: float) -> int:
    """The 1-based rank of the value at `percentile` among `count` sorted values (nearest-rank method)."""
    if count <= 0:
        raise ValueError("no values")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile {percentile} is outside 0..100")
    return max(1, math.ceil(percentile / 100.0 * count - 1e-9))


def exact_percentile(sorted_values: Sequence[float], percentile: float) -> float:
    """The nearest-rank percentile of already sorted values (what the histogram approximates)."""
    return sorted_values[nearest_rank(len(sorted_values), percentile) - 1]


@dataclass
class Histogram:
    bits: int = DEFAULT_BITS
    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0
    sum: int = 0
    min: int | None = None
    max: int | None = None

    def record(self, value: int, count: int = 1) -> None:
        value = max(0, int(value))
        index = bucket_index(value, self.bits)
        self.counts[index] = self.counts.get(index, 0) + count
        self.total += count
        self.sum += value * count
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def record_many(self, values: Iterable[int]) -> None:
        for v in values:
            self.record(v)

    def merge(self, other: Histogram) -> None:
        if other.bits != self.bits:
            raise ValueError(f"cannot merge histograms of {other.bits} and {self.bits} bits")
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.total += other.total
        self.sum += other.sum
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)

    def percentile(self, percentile: float) -> int:
        """The value at `percentile` (0..100): the top of the bucket holding that rank, capped at max."""
        rank = nearest_rank(self.total, percentile)
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                high = bucket_bounds(index, self.bits)[1]
                return min(high, self.max if self.max is not None else high)
        raise AssertionError("histogram counts do not add up to its total")

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def summary(self, percentiles: Sequence[float] = STANDARD_PERCENTILES) -> dict[str, float]:
        """`{"count", "mean", "min", "max", "p50", ...}`, values in the histogram's unit."""
        if not self.total:
            return {"count": 0}
        out: dict[str, float] = {"count": self.total, "mean": round(self.mean, 1),
                                 "min": self.min or 0, "max": self.max or 0}
        for p in percentiles:
            out[percentile_key(p)] = self.percentile(p)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "total": self.total, "sum": self.sum, "min": self.min, "max": self.max,
                "counts": sorted([i, n] for i, n in self.counts.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Histogram:
        counts = {int(i): int(n) for i, n in data.get("counts") or []}
        h = cls(bits=int(data.get("bits", DEFAULT_BITS)), counts=counts)
        h.total = int(data.get("total", sum(counts.values())))
        h.sum = int(data.get("sum", 0))
        h.min = None if data.get("min") is None else int(data["min"])
        h.max = None if data.get("max") is None else int(data["max"])
        return h


def percentile_key(p: float) -> str:
    """50 -> "p50", 99.9 -> "p99.9"."""
    return f"p{p:g}"
