"""Percentile math of the bench's HDR-like histogram: bucket bounds, precision, nearest rank, merging."""

from __future__ import annotations

import random

import pytest

from bench.histogram import Histogram, bucket_bounds, bucket_index, exact_percentile, nearest_rank


def test_small_values_are_exact() -> None:
    for v in range(0, 1024):
        assert bucket_bounds(bucket_index(v)) == (v, v)


def test_buckets_are_contiguous_and_hold_their_values() -> None:
    previous_high = -1
    for index in range(0, bucket_index(10_000_000) + 1):
        low, high = bucket_bounds(index)
        assert low == previous_high + 1
        assert bucket_index(low) == index and bucket_index(high) == index
        previous_high = high


def test_relative_error_is_bounded() -> None:
    for v in (1500, 12_345, 999_999, 5_000_000, 123_456_789):
        low, high = bucket_bounds(bucket_index(v))
        assert low <= v <= high
        assert (high - low) / v < 1 / 500


def test_nearest_rank() -> None:
    assert nearest_rank(100, 50) == 50
    assert nearest_rank(100, 99) == 99
    assert nearest_rank(100, 99.9) == 100
    assert nearest_rank(10, 0) == 1
    assert nearest_rank(3, 50) == 2
    with pytest.raises(ValueError):
        nearest_rank(0, 50)
    with pytest.raises(ValueError):
        nearest_rank(10, 101)


def test_percentiles_match_exact_within_precision() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(6, 1.2)) for _ in range(20_000)]
    h = Histogram()
    h.record_many(values)
    ordered = sorted(values)
    for p in (50, 90, 99, 99.9, 100):
        exact = exact_percentile(ordered, p)
        got = h.percentile(p)
        assert exact <= got <= exact * 1.002 + 1, (p, exact, got)
    assert h.total == len(values)
    assert h.max == ordered[-1] and h.min == ordered[0]
    assert h.mean == pytest.approx(sum(values) / len(values))


def test_percentile_never_exceeds_max() -> None:
    h = Histogram()
    h.record(100_001)
    assert h.percentile(50) == 100_001


def test_merge_equals_recording_everything() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(1, 3000):
        (a if i % 2 else b).record(i * 7)
        both.record(i * 7)
    a.merge(b)
    assert a.counts == both.counts and a.total == both.total and a.sum == both.sum
    assert (a.min, a.max) == (both.min, both.max)


def test_json_round_trip() -> None:
    h = Histogram()
    h.record_many([5, 50, 500, 5000, 50_000])
    again = Histogram.from_json(h.to_json())
    assert again.summary() == h.summary()
    assert Histogram().summary() == {"count": 0}
