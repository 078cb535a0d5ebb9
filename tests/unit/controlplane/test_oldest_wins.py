"""Creation metadata in the store, and Istio's "oldest wins" for two VirtualServices of one host.

- The store gives each object `metadata.creationTimestamp` and `metadata.uid` when it creates it, keeps
  both on updates and labels, ignores what a user writes there, saves them (a restart keeps them), and
  gives them once to a saved store from before they existed.  A mirror of an API server keeps the API
  server's.
- Translation: of two VirtualServices naming one host, the older routes it at the waypoint, whichever
  name sorts first and in whichever order they were created; the newer one loses only that host.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from controlplane.config.store import STATE_FILE, Store, timestamp
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.loader import load_paths, parse_text
from mesh.api.validate import Ref
from waypoint.config import compile_table

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "istio"
HOST = "reviews.default.svc.cluster.local"
NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def vs(name: str, subset: str, hosts: str = "[reviews]") -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default}}\n"
            f"spec:\n  hosts: {hosts}\n  http:\n  - route:\n    - destination: {{host: reviews, subset: {subset}}}\n")


class Clock:
    """A clock that moves one second per reading, from a fixed start."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1_800_000_000)

    def __call__(self) -> float:
        return float(next(self._ticks))


def bookinfo(clock: Clock) -> Store:
    store = Store(clock=clock)
    for name in ("bookinfo-platform.yaml", "destination-rule-all.yaml", "waypoint.yaml"):
        store.apply(load_paths([str(FIXTURES / name)]))
    store.label(Ref("Namespace", "", "default"), {"istio.io/use-waypoint": "waypoint"})
    return store


def routed_subset(store: Store) -> str:
    """The subset the waypoint routes reviews to, from the L7 configuration translation sends it."""
    t = translate_snapshot(store.snapshot())
    table = compile_table("default/waypoint", t.workloads.values(), t.services.values(), t.l7.values()).table
    rules = table.virtual_service(HOST)
    assert rules is not None
    return f"{rules.namespace}/{rules.name}"


def test_the_store_sets_creation_metadata_once(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, clock=clock)
    store.apply(parse_text(NS.replace("{name: shop}", "{name: shop, uid: mine, creationTimestamp: '2001-01-01T00:00:00Z'}"),
                           "ns.yaml"))
    [body] = store.select("Namespace")
    meta = dict(body["metadata"])
    assert meta["creationTimestamp"] == timestamp(1_800_000_000) == "2027-01-15T08:00:00.000000Z"
    assert meta["uid"] != "mine" and len(meta["uid"]) == 36  # what a user writes there is ignored
    store.label(Ref("Namespace", "", "shop"), {"team": "a"})
    store.apply(parse_text(NS.replace("{name: shop}", "{name: shop, labels: {team: b}}"), "ns.yaml"))
    [body] = store.select("Namespace")
    assert body["metadata"]["generation"] == 3
    assert (body["metadata"]["creationTimestamp"], body["metadata"]["uid"]) == (meta["creationTimestamp"], meta["uid"])
    [again] = Store(tmp_path, clock=clock).select("Namespace")  # a restart
    assert (again["metadata"]["creationTimestamp"], again["metadata"]["uid"]) == (meta["creationTimestamp"], meta["uid"])
    store.delete_refs([Ref("Namespace", "", "shop")])
    store.apply(parse_text(NS, "ns.yaml"))  # created again: a new object
    [new] = store.select("Namespace")
    assert new["metadata"]["creationTimestamp"] > meta["creationTimestamp"] and new["metadata"]["uid"] != meta["uid"]


def test_a_saved_store_without_creation_metadata_gets_it_once(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"format": 1, "version": 4, "resources": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "resourceVersion": "4", "generation": 1}}]}))
    [first] = Store(tmp_path, clock=Clock()).select("Namespace")
    assert first["metadata"]["creationTimestamp"] and first["metadata"]["uid"]
    [second] = Store(tmp_path, clock=lambda: 1_900_000_000.0).select("Namespace")
    assert second["metadata"] == first["metadata"]


def test_a_mirror_keeps_the_api_servers_creation_metadata() -> None:
    mirror = Store(check_references=False, clock=Clock())
    mirror.apply(parse_text(NS.replace("{name: shop}", "{name: shop, uid: 3f1d, creationTimestamp: '2026-01-02T03:04:05Z'}"),
                            "k8s"))
    [body] = mirror.select("Namespace")
    assert (body["metadata"]["uid"], body["metadata"]["creationTimestamp"]) == ("3f1d", "2026-01-02T03:04:05Z")


@pytest.mark.parametrize(("first", "second"), [("reviews-b", "reviews-a"), ("reviews-a", "reviews-b")])
def test_the_oldest_virtual_service_of_a_host_wins(first: str, second: str) -> None:
    store = bookinfo(Clock())
    store.apply(parse_text(vs(first, "v2"), "first.yaml"))
    store.apply(parse_text(vs(second, "v3"), "second.yaml"))
    assert routed_subset(store) == f"default/{first}"
    t = translate_snapshot(store.snapshot())
    assert t.l7[f"VirtualService/default/{first}"].waypoints == ["default/waypoint"]
    loser = t.l7[f"VirtualService/default/{second}"]
    assert list(loser.waypoints) == [] and list(loser.hostnames) == []
    assert (f"VirtualService default/{second}: host {HOST} is already routed by the older VirtualService "
            f"default/{first}: ignored for that host (the oldest wins)") in t.problems
    store.delete_refs([Ref("VirtualService", "default", first)])  # the oldest goes: the next one takes over
    assert routed_subset(store) == f"default/{second}"


def test_created_together_the_name_decides_and_a_loser_keeps_its_other_hosts() -> None:
    store = bookinfo(Clock())
    store.apply(parse_text(vs("zeta", "v2") + "---\n" + vs("alpha", "v3", "[reviews, ratings]"), "both.yaml"))
    assert routed_subset(store) == "default/alpha"
    t = translate_snapshot(store.snapshot())
    zeta = t.l7["VirtualService/default/zeta"]
    assert list(zeta.waypoints) == [] and list(zeta.hostnames) == []
    store.apply(parse_text(vs("older", "v1", "[ratings]").replace("name: older", "name: omega"), "later.yaml"))
    t = translate_snapshot(store.snapshot())
    omega = t.l7["VirtualService/default/omega"]
    assert list(omega.hostnames) == [] and list(omega.waypoints) == []  # ratings was alpha's first
    store.delete_refs([Ref("VirtualService", "default", "alpha")])
    store.apply(parse_text(vs("alpha", "v3", "[ratings, reviews]"), "again.yaml"))  # now the newest
    t = translate_snapshot(store.snapshot())
    alpha = t.l7["VirtualService/default/alpha"]
    assert list(alpha.hostnames) == []  # zeta holds reviews, omega ratings
    assert routed_subset(store) == "default/zeta"
    assert list(t.l7["VirtualService/default/omega"].hostnames) == ["ratings.default.svc.cluster.local"]
    store.apply(parse_text(vs("beta", "v1", "[details, reviews]"), "beta.yaml"))  # loses reviews only
    beta = translate_snapshot(store.snapshot()).l7["VirtualService/default/beta"]
    assert list(beta.hostnames) == ["details.default.svc.cluster.local"] and beta.waypoints == ["default/waypoint"]
    assert list(beta.spec["hosts"]) == ["details"]
    assert routed_subset(store) == "default/zeta"
