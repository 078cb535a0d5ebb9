"""Every Istio example in tests/fixtures/istio is accepted as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config.store import Store
from mesh.api.loader import load_paths, parse_text
from mesh.api.schema import parse_duration
from mesh.api.validate import check_document

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "istio"
FILES = sorted(p.name for p in FIXTURES.glob("*.yaml"))


@pytest.mark.parametrize("name", FILES)
def test_fixture_is_valid(name: str) -> None:
    docs = load_paths([str(FIXTURES / name)])
    assert docs
    for doc in docs:
        body, errors = check_document(doc.body)
        assert errors == [], [str(e) for e in errors]
        assert body is not None


def test_all_fixtures_apply_in_order_to_one_store() -> None:
    store = Store()
    first = ["bookinfo-platform.yaml", "destination-rule-all.yaml", "waypoint.yaml"]
    for name in first + [n for n in FILES if n not in first]:
        store.apply(load_paths([str(FIXTURES / name)]))
    snap = store.snapshot()
    reviews = snap.get("VirtualService", "default", "reviews")
    assert reviews is not None
    assert len(snap.of_kind("Pod")) == 6


@pytest.mark.parametrize(
    ("name", "weights"),
    [("virtual-service-reviews-20-80.yaml", [20, 80]), ("virtual-service-reviews-95-5.yaml", [95, 5]),
     ("virtual-service-reviews-80-20.yaml", [80, 20])],
)
def test_weighted_routes(name: str, weights: list[int]) -> None:
    (doc,) = load_paths([str(FIXTURES / name)])
    body, _ = check_document(doc.body)
    assert body is not None
    assert [r["weight"] for r in body["spec"]["http"][0]["route"]] == weights


def test_the_examples_the_issue_names() -> None:
    (jason,) = load_paths([str(FIXTURES / "virtual-service-reviews-test-v2.yaml")])
    match = jason.body["spec"]["http"][0]
    assert match["match"][0]["headers"]["end-user"] == {"exact": "jason"}
    assert match["route"][0]["destination"]["subset"] == "v2"
    delay = load_paths([str(FIXTURES / "virtual-service-fault-reference.yaml")])[0]
    assert delay.body["spec"]["http"][0]["fault"]["delay"] == {"percentage": {"value": 0.1}, "fixedDelay": "2s"}
    abort = load_paths([str(FIXTURES / "virtual-service-fault-reference.yaml")])[1]
    assert abort.body["spec"]["http"][0]["fault"]["abort"]["httpStatus"] == 400


def test_namespace_defaults_and_server_fields_are_dropped() -> None:
    (doc,) = parse_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, resourceVersion: '7'}\n", "x")
    body, errors = check_document(doc.body, "shop")
    assert errors == [] and body is not None
    assert body["metadata"] == {"name": "a", "namespace": "shop"}


@pytest.mark.parametrize(("text", "seconds"), [("2s", 2), ("100ms", 0.1), ("1.5s", 1.5), ("1m", 60), ("1h30m", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
