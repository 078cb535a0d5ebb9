"""The per-request report (metrics and access-log line) takes shortcuts; what it writes must not change."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from prometheus_client import CollectorRegistry

from mesh.istiometrics import RequestLabels, RequestMetrics
from waypoint import accesslog
from waypoint.accesslog import AccessRecord, format_values
from waypoint.metrics import WaypointMetrics


def _plain_values() -> dict[str, object]:
    values: dict[str, object] = {f.name: f"{f.name} \"é\"\n\\" if f.type == "str" else 3 for f in fields(AccessRecord)}
    values["duration_ms"] = 0.125
    return values


def _reference(values: dict[str, object]) -> str:
    return json.dumps(values, separators=(",", ":"), sort_keys=True)


def test_plain_values_are_written_without_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _plain_values()
    expected = _reference(values)

    class Refuse:
        def encode(self, _: object) -> str:
            raise AssertionError("the encoder was used for plain values")

    monkeypatch.setattr(accesslog, "_ENCODER", Refuse())
    line = format_values(values)
    assert line == expected
    assert list(json.loads(line)) == sorted(f.name for f in fields(AccessRecord))  # every field, sorted


@pytest.mark.parametrize("field, value", [
    ("attempts", True), ("response_code", 2.0), ("bytes_sent", None), ("duration_ms", float("nan")),
    ("duration_ms", float("-inf")), ("duration_ms", 7), ("duration_ms", -0.0), ("details", None),
    ("path", 5), ("user_agent", ["a"]), ("authority", "\ud800"), ("route_name", "\x00\x1f\x7f\u2028"),
])
def test_values_off_the_plain_types_give_the_encoders_line(field: str, value: object) -> None:
    values = _plain_values() | {field: value}
    assert format_values(values) == _reference(values)


def test_a_missing_field_is_an_error_that_names_it() -> None:
    values = _plain_values()
    del values["route_name"]
    with pytest.raises(KeyError, match="route_name"):
        format_values(values)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}


def test_recording_through_kept_children_counts_what_request_metrics_counts() -> None:
    mine, reference = WaypointMetrics(), CollectorRegistry()
    ref = RequestMetrics(reference, " by the waypoint")
    ok = RequestLabels(reporter="waypoint", destination_service="a.ns.svc.cluster.local", response_code="200")
    same = RequestLabels(reporter="waypoint", destination_service="a.ns.svc.cluster.local", response_code="200")
    failed = RequestLabels(reporter="waypoint", destination_service="a.ns.svc.cluster.local", response_code="503",
                           response_flags="UF")
    for labels, duration, sent in ((ok, 1.5, 10), (same, 700.0, 0), (failed, 0.2, 91), (ok, 3.0, 4096)):
        mine.record(labels, duration, 120, sent)
        ref.record(labels, duration, 120, sent)
    got = _samples(mine.registry)
    assert got == _samples(reference)
    total = [v for (name, labels), v in got.items() if name == "istio_requests_total"
             and ("response_code", "200") in labels]
    assert total == [3.0]  # two objects with one label set: one series


def test_children_are_looked_up_once_per_label_object(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = WaypointMetrics()
    labels = RequestLabels(reporter="waypoint", destination_service="b.ns.svc.cluster.local", response_code="200")
    calls: list[object] = []
    original = RequestLabels.values
    monkeypatch.setattr(RequestLabels, "values", lambda self: calls.append(self) or original(self))
    for _ in range(5):
        metrics.record(labels, 1.0, 1, 1)
    assert calls == [labels]
