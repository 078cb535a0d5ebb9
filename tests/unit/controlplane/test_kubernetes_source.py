"""The Kubernetes configuration source, with the real `kubernetes` client, against the stand-in API server."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer
from kube_objects import (
    endpoint_slice,
    namespace,
    node,
    pod,
    service,
    service_account,
    virtual_service,
    waypoint,
)

from controlplane.config.kubeobjects import refusal_message, resource_for, to_document
from controlplane.config.kubernetes import KubernetesSource, KubernetesSourceError, Timing, api_client
from controlplane.config.store import Store
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.validate import Ref, check_document
from mesh.proto import discovery_pb2 as pb

pytestmark = pytest.mark.timeout(30)
FAST = Timing(backoff_initial=0.05, backoff_max=0.2, watch_timeout=5, request_timeout=2.0)
Factory = Callable[..., KubernetesSource]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def make_source(api: FakeApiServer, tmp_path: Path) -> Iterator[Factory]:
    """Starts a source on the stand-in (through a kubeconfig file, as `--kubeconfig` does); stops it after."""
    started: list[KubernetesSource] = []
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())

    def make(timing: Timing = FAST, sync: bool = True) -> KubernetesSource:
        source = KubernetesSource(api_client(kubeconfig), Store(check_references=False), timing=timing)
        started.append(source)
        source.start()
        if sync:
            source.wait_synced(5)
        return source

    yield make
    for source in started:
        source.stop()


def refs(source: KubernetesSource, kind: str | None = None) -> set[str]:
    return {str(r) for r in source.store.snapshot() if kind is None or r.kind == kind}


def test_the_first_list_fills_the_store_and_translation_makes_workloads(api: FakeApiServer,
                                                                        make_source: Factory) -> None:
    api.put(namespace("default", **{"istio.io/dataplane-mode": "ambient"}))
    api.put(service_account("sleep"))
    api.put(pod("sleep-7d9", node="node-1", ip="10.244.1.5", sa="sleep", labels={"app": "sleep"}))
    api.put(service("sleep", vip="10.96.0.10"))
    api.put(node("node-1"))
    api.put(endpoint_slice("sleep"))
    api.put(virtual_service("reviews"))
    api.put(waypoint("waypoint"))
    api.put(waypoint("ingress", gateway_class="istio"))  # another implementation's Gateway

    source = make_source()

    assert refs(source) == {"Namespace/default", "ServiceAccount/default/sleep", "Pod/default/sleep-7d9",
                            "Service/default/sleep", "VirtualService/default/reviews", "Gateway/default/waypoint"}
    translation = translate_snapshot(source.store.snapshot())
    workload = translation.workloads["default/sleep-7d9"]
    assert (workload.node, list(workload.addresses), workload.service_account) == ("node-1", ["10.244.1.5"], "sleep")
    assert workload.tunnel_protocol == pb.HBONE  # the namespace is ambient
    svc = translation.services["default/sleep.default.svc.cluster.local"]
    assert list(svc.vips) == ["10.96.0.10"] and svc.ports[0].target_port == 8080
    assert [e.workload_uid for e in svc.endpoints] == ["default/sleep-7d9"]
    assert [n["metadata"]["name"] for n in source.objects("Node")] == ["node-1"]
    assert [s["metadata"]["name"] for s in source.objects("EndpointSlice")] == ["sleep-abcde"]
    # The client authenticated with the kubeconfig's token and asked for bookmarks on its watches.
    assert all(r.headers.get("authorization") == "Bearer control-plane-token" for r in api.requests)
    assert api.wait_for(lambda: api.watch_requests("pods"))
    watch = api.watch_requests("pods")[0]
    assert watch.query["allowWatchBookmarks"] == "true" and watch.query["resourceVersion"]


def test_added_modified_and_deleted_flow_through(api: FakeApiServer, make_source: Factory) -> None:
    api.put(namespace("default"))
    source = make_source()

    api.put(pod("web-1", labels={"app": "web"}))
    assert api.wait_for(lambda: "Pod/default/web-1" in refs(source))
    api.put(pod("web-1", labels={"app": "web", "version": "v2"}))
    assert api.wait_for(lambda: source.store.snapshot().get("Pod", "default", "web-1")["metadata"]["labels"]
                        == {"app": "web", "version": "v2"})
    api.delete("Pod", "default", "web-1")
    assert api.wait_for(lambda: "Pod/default/web-1" not in refs(source))
    api.put(node("node-2"))
    assert api.wait_for(lambda: [n["metadata"]["name"] for n in source.objects("Node")] == ["node-2"])
    api.delete("Node", "", "node-2")
    assert api.wait_for(lambda: source.objects("Node") == [])


def test_a_bookmark_moves_the_resource_version_on_and_the_next_watch_starts_there(
        api: FakeApiServer, make_source: Factory) -> None:
    source = make_source()
    assert api.wait_for(lambda: api.watch_requests("pods"))
    lists_before = len(api.list_requests("pods"))

    version = api.bookmark("Pod")
    assert api.wait_for(lambda: source.resource_version("Pod") == version)
    api.drop_watches()
    assert api.wait_for(lambda: len(api.watch_requests("pods")) == 2)
    assert api.watch_requests("pods")[1].query["resourceVersion"] == version
    assert len(api.list_requests("pods")) == lists_before  # resumed, not listed again


def test_410_gone_lists_again_and_nothing_is_lost_or_doubled(api: FakeApiServer, make_source: Factory) -> None:
    api.put(namespace("default"))
    for i in range(3):
        api.put(pod(f"web-{i}", ip=f"10.244.1.{10 + i}"))
    source = make_source()
    assert api.wait_for(lambda: api.watch_requests("pods"))
    lists_before = len(api.list_requests("pods"))

    # Changes in history the API server compacted away: only a new list shows them.
    api.delete("Pod", "default", "web-0", history=False)
    api.put(pod("web-1", ip="10.244.1.99"), history=False)
    api.put(pod("web-9", ip="10.244.1.19"), history=False)
    api.expire_watches()

    assert api.wait_for(lambda: refs(source, "Pod") == {"Pod/default/web-1", "Pod/default/web-2", "Pod/default/web-9"})
    assert len(api.list_requests("pods")) == lists_before + 1
    assert source.store.snapshot().get("Pod", "default", "web-1")["status"]["podIP"] == "10.244.1.99"
    workloads = translate_snapshot(source.store.snapshot()).workloads
    assert sorted(workloads) == ["default/web-1", "default/web-2", "default/web-9"]
    # And it watches on from the new list.
    api.put(pod("web-3", ip="10.244.1.13"))
    assert api.wait_for(lambda: "Pod/default/web-3" in refs(source))


def test_a_dropped_connection_is_watched_again_from_where_it_was_with_capped_backoff(
        api: FakeApiServer, make_source: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "controlplane.config.kubernetes")
    source = make_source()
    assert api.wait_for(lambda: api.watch_requests("pods"))
    lists_before, watches_before = len(api.list_requests("pods")), len(api.watch_requests("pods"))

    api.fail("GET", "/api/v1/pods", 500, times=4, when="watch")
    api.drop_watches()
    api.put(pod("late-1"))  # happens while the source is away: the resumed watch replays it
    assert api.wait_for(lambda: "Pod/default/late-1" in refs(source))

    attempts = [r.at for r in api.watch_requests("pods")[watches_before - 1:]]
    assert len(attempts) == 6  # the dropped watch, four refused, the one that worked
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    delays = [float(d) for d in re.findall(r"watching pods failed .*; retrying in ([0-9.]+)s", caplog.text)]
    assert len(delays) == len(gaps) == 5, caplog.text
    for failures, (gap, delay) in enumerate(zip(gaps, delays, strict=True)):
        # The delay is jittered in [cap/2, cap], cap = initial * 2**failures, at most max (logged to 0.01 s) ...
        cap = min(FAST.backoff_max, FAST.backoff_initial * 2 ** failures)
        assert cap / 2 - 0.006 <= delay <= cap + 0.006, (failures, delays)
        # ... and the source waited that long before trying again (a busy machine may add to the gap).
        assert delay - 0.006 <= gap <= delay + 1.0, (failures, gap, delay)
    assert len(api.list_requests("pods")) == lists_before  # no list: resumed from the resourceVersion


def test_a_failing_list_is_retried_until_it_works(api: FakeApiServer, make_source: Factory) -> None:
    api.put(pod("web-1"))
    api.fail("GET", "/api/v1/pods", 503, times=2)
    source = make_source()
    assert "Pod/default/web-1" in refs(source)
    assert len(api.list_requests("pods")) == 3


def test_a_list_is_read_page_by_page(api: FakeApiServer, make_source: Factory) -> None:
    for i in range(5):
        api.put(pod(f"web-{i}", ip=f"10.244.1.{10 + i}"))
    source = make_source(Timing(backoff_initial=0.05, backoff_max=0.2, watch_timeout=5, page_size=2))
    assert len(refs(source, "Pod")) == 5
    pages = api.list_requests("pods")
    assert [r.query.get("continue") for r in pages] == [None, "2", "4"]
    assert all(r.query["limit"] == "2" for r in pages)


def test_a_collection_that_is_not_served_is_empty_until_its_crd_comes(api: FakeApiServer,
                                                                      make_source: Factory) -> None:
    api.unserved.add("gateways")
    api.put(waypoint("waypoint"))
    source = make_source()  # synced all the same
    assert "Gateway/default/waypoint" not in refs(source)
    api.unserved.clear()
    assert api.wait_for(lambda: "Gateway/default/waypoint" in refs(source))


def test_a_refused_object_is_reported_and_everything_else_applies(api: FakeApiServer, make_source: Factory) -> None:
    api.put(namespace("default"))
    api.put(virtual_service("good"))
    bad = api.put(virtual_service("bad", timeout="forever"))
    source = make_source()

    assert refs(source, "VirtualService") == {"VirtualService/default/good"}
    _, errors = check_document(to_document(resource_for("VirtualService"), bad))
    message = refusal_message(errors)
    assert message.startswith("spec.http[0].timeout: 'forever' is not a duration")
    assert source.reporter.refusals() == {Ref("VirtualService", "default", "bad"): message}
    source.reporter.drain()
    [event] = api.events
    assert event["involvedObject"]["kind"] == "VirtualService" and event["involvedObject"]["name"] == "bad"
    assert event["involvedObject"]["uid"] == bad["metadata"]["uid"]
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "InvalidConfiguration", message)
    assert event["metadata"]["namespace"] == "default"
    [condition] = api.get("VirtualService", "default", "bad")["status"]["conditions"]
    assert (condition["type"], condition["status"], condition["message"]) == ("Accepted", "False", message)

    # The watch keeps flowing: another bad one, and good objects beside it.
    api.put(virtual_service("worse", timeout="-1s"))
    api.put(pod("web-1"))
    assert api.wait_for(lambda: "Pod/default/web-1" in refs(source))
    assert api.wait_for(lambda: len(api.events) == 2)
    assert "VirtualService/default/worse" not in refs(source)

    # The status patch came back as a MODIFIED event: not reported twice.
    source.reporter.drain()
    assert len(api.events) == 2

    # A bad change to an accepted object keeps the accepted version; a fix is accepted and said so.
    api.put(virtual_service("good", timeout="soon"))
    assert api.wait_for(lambda: len(api.events) == 3)
    assert source.store.snapshot().get("VirtualService", "default", "good")["spec"]["http"][0]["timeout"] == "2s"
    api.put(virtual_service("bad", timeout="3s"))
    assert api.wait_for(lambda: "VirtualService/default/bad" in refs(source))
    assert api.wait_for(lambda: api.get("VirtualService", "default", "bad")["status"]["conditions"][0]["status"] == "True")
    assert Ref("VirtualService", "default", "bad") not in source.reporter.refusals()


def test_deleting_a_destination_rule_still_in_use_goes_through(api: FakeApiServer, make_source: Factory) -> None:
    """The API server is the truth: the store mirrors a deletion the local store would refuse."""
    api.put({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
             "metadata": {"name": "reviews", "namespace": "default"},
             "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}})
    vs = virtual_service("reviews")
    vs["spec"]["http"][0]["route"][0]["destination"]["subset"] = "v1"
    api.put(vs)
    source = make_source()
    assert {"DestinationRule/default/reviews", "VirtualService/default/reviews"} <= refs(source)
    api.delete("DestinationRule", "default", "reviews")
    assert api.wait_for(lambda: "DestinationRule/default/reviews" not in refs(source))


def test_wait_synced_says_what_could_not_be_listed(tmp_path: Path) -> None:
    api = FakeApiServer().start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    api.stop()  # nobody answers at that address any more
    source = KubernetesSource(api_client(kubeconfig), Store(check_references=False), timing=FAST)
    source.start()
    try:
        with pytest.raises(KubernetesSourceError, match=r"could not list .*pods.* is the API server reachable"):
            source.wait_synced(0.3)
    finally:
        source.stop()


def test_without_a_kubeconfig_outside_a_pod_the_client_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesSourceError, match="pass --kubeconfig"):
        api_client(None)
    with pytest.raises(KubernetesSourceError, match="kubeconfig /nonexistent"):
        api_client("/nonexistent")
