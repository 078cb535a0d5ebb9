"""The configuration store: apply, delete, label, persistence across instances, all-or-nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config.source import ChangeEvent
from controlplane.config.store import STATE_FILE, Store, StoreError
from mesh.api.errors import Conflict, NotFound, ValidationError
from mesh.api.loader import parse_text
from mesh.api.validate import Ref

DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"""
VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 20
    - destination: {host: reviews, subset: v2}
      weight: 80
"""
NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}\n"


def docs(text: str, source: str = "f.yaml"):  # type: ignore[no-untyped-def]
    return parse_text(text, source)


def test_apply_create_configure_unchanged(tmp_path: Path) -> None:
    store = Store(tmp_path)
    r1 = store.apply(docs(NS + "---\n" + DR + "---\n" + VS))
    assert [o.action for o in r1.outcomes] == ["created"] * 3 and r1.version == 1
    r2 = store.apply(docs(NS + "---\n" + DR + "---\n" + VS))
    assert [o.action for o in r2.outcomes] == ["unchanged"] * 3 and r2.version == 1
    r3 = store.apply(docs(VS.replace("20", "30").replace("80", "70")))
    assert [o.action for o in r3.outcomes] == ["configured"] and r3.version == 2
    body = store.snapshot().get("VirtualService", "bookinfo", "reviews")
    assert body is not None and body["metadata"]["resourceVersion"] == "2" and body["metadata"]["generation"] == 2
    assert str(r3.outcomes[0]) == "virtualservice.networking.istio.io/reviews in bookinfo configured"


def test_state_survives_a_new_store_instance(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.apply(docs(NS + "---\n" + DR + "---\n" + VS))
    store.label(Ref("Namespace", "", "bookinfo"), {"istio.io/dataplane-mode": "ambient"})
    again = Store(tmp_path)
    assert again.version == store.version == 2
    assert dict(again.snapshot().resources) == dict(store.snapshot().resources)
    assert again.select("Namespace")[0]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    again.delete_refs([Ref("VirtualService", "bookinfo", "reviews")])
    assert Store(tmp_path).snapshot().get("VirtualService", "bookinfo", "reviews") is None


def test_apply_with_any_error_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.apply(docs(NS))
    before = (tmp_path / STATE_FILE).read_bytes()
    events: list[ChangeEvent] = []
    store.subscribe(events.append)
    bad = VS.replace("weight: 80", "weight: 81")
    with pytest.raises(ValidationError) as info:
        store.apply(docs(DR + "---\n" + bad))
    assert "f.yaml:document 2:spec.http[0].route[1].weight" in str(info.value)
    assert store.version == 1 and store.snapshot().get("DestinationRule", "bookinfo", "reviews") is None
    assert (tmp_path / STATE_FILE).read_bytes() == before and events == []


def test_subscribers_see_each_change(tmp_path: Path) -> None:
    store = Store(tmp_path)
    events: list[ChangeEvent] = []
    unsubscribe = store.subscribe(events.append)
    store.apply(docs(NS + "---\n" + DR))
    store.delete(docs(DR))
    assert events[0].version == 1 and events[0].kinds == {"Namespace", "DestinationRule"}
    assert events[1].removed == {Ref("DestinationRule", "bookinfo", "reviews")}
    unsubscribe()
    store.apply(docs(DR))
    assert len(events) == 2


def test_deleting_a_subset_in_use_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.apply(docs(NS + "---\n" + DR + "---\n" + VS))
    with pytest.raises(Conflict, match="subset 'v1' of reviews.bookinfo.svc.cluster.local is still used"):
        store.delete_refs([Ref("DestinationRule", "bookinfo", "reviews")])
    with pytest.raises(ValidationError) as info:
        store.apply(docs(DR.replace(", {name: v2, labels: {version: v2}}", ""), "dr.yaml"))
    assert str(info.value).startswith("dr.yaml:document 1:spec.subsets: subset 'v2'")
    # Deleting both in one request is fine.
    result = store.delete(docs(DR + "---\n" + VS))
    assert [o.action for o in result.outcomes] == ["deleted", "deleted"]


def test_delete_missing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ValidationError, match="f.yaml:document 1: DestinationRule/bookinfo/reviews not found"):
        store.delete(docs(DR))
    assert store.delete(docs(DR), ignore_not_found=True).outcomes == ()
    with pytest.raises(NotFound):
        store.delete_refs([Ref("Pod", "x", "y")])


def test_label_set_remove_and_validate(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.apply(docs(NS))
    ref = Ref("Namespace", "", "bookinfo")
    assert store.label(ref, {"istio.io/use-waypoint": "waypoint"}).outcomes[0].action == "labeled"
    assert store.label(ref, {"istio.io/use-waypoint": "waypoint"}).outcomes[0].action == "unchanged"
    with pytest.raises(ValidationError, match="must be one of ambient, none"):
        store.label(ref, {"istio.io/dataplane-mode": "yes"})
    with pytest.raises(ValidationError, match="label key"):
        store.label(ref, {"bad key": "x"})
    store.label(ref, {}, remove=["istio.io/use-waypoint"])
    assert "labels" not in store.select("Namespace", name="bookinfo")[0]["metadata"]
    with pytest.raises(NotFound):
        store.label(Ref("Namespace", "", "nope"), {"a": "b"})


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="cannot read the saved configuration"):
        Store(tmp_path)


def test_select_filters(tmp_path: Path) -> None:
    store = Store()
    store.apply(docs(NS + "---\n" + DR + "---\n" + VS))
    assert [b["kind"] for b in store.select(namespace="bookinfo")] == ["DestinationRule", "VirtualService"]
    with pytest.raises(NotFound, match="VirtualService 'x' not found in namespace bookinfo"):
        store.select("VirtualService", "bookinfo", "x")
