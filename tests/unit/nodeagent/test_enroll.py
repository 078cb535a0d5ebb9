"""Enrollment against a scripted pod source and redirector: the order of listeners and capture, what
is adopted, removed and retried, and that nothing is released when the agent stops."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from mesh.identity import SpiffeId
from mesh.netns import NetnsError
from nodeagent.enroll import Enroller
from nodeagent.errors import RedirectError
from nodeagent.pods.source import PodRef
from nodeagent.redirect.base import Capture, Outcome
from nodeagent.redirect.base import Redirector as RedirectorSeam
from nodeagent.redirect.iptables import IptablesRedirector


def pod(tmp_path: Path, name: str, *, netns: bool = True) -> PodRef:
    path = tmp_path / f"netns-{name}"
    if netns:
        path.touch()
    return PodRef(uid=f"uid-{name}", namespace="default", name=name, ip="10.244.1.5",
                  identity=SpiffeId("cluster.local", "default", name), netns=str(path))


class Pods:
    def __init__(self, desired: list[PodRef], others: list[PodRef] = ()) -> None:  # type: ignore[assignment]
        self.want = {p.uid: p for p in desired}
        self.others = list(others)
        self.callbacks: list[Callable[[], None]] = []

    def desired(self) -> dict[str, PodRef]:
        return dict(self.want)

    def on_node(self) -> list[PodRef]:
        return [*self.want.values(), *self.others]

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)


class Redirector:
    mode = "scripted"

    def __init__(self, events: list[str], fail: dict[str, Exception] | None = None) -> None:
        self.events = events
        self.fail = fail or {}
        self.captured: set[str] = set()

    def install(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> Outcome:
        if pod.name in self.fail:
            raise self.fail.pop(pod.name)
        self.events.append(f"install {pod.name} {sorted(listeners)}")
        adopted = pod.name in self.captured
        self.captured.add(pod.name)
        return Outcome.ADOPTED if adopted else Outcome.INSTALLED

    def adopt(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> bool:
        return pod.name in self.captured

    def remove(self, pod: PodRef) -> bool:
        self.events.append(f"remove {pod.name}")
        had = pod.name in self.captured
        self.captured.discard(pod.name)
        return had

    def verify(self, pod: PodRef) -> Capture:
        return Capture(self.mode, present=pod.name in self.captured, exact=pod.name in self.captured)

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        raise AssertionError("not used by enrollment")


class Handle:
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events
        self.listeners: dict[int, socket.socket] = {15001: None, 15006: None, 15008: None}  # type: ignore[dict-item]

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def starter(events: list[str], fail: dict[str, Exception] | None = None):  # type: ignore[no-untyped-def]
    fail = fail or {}

    async def start_pod(ref: PodRef) -> Handle:
        if ref.name in fail:
            raise fail.pop(ref.name)
        events.append(f"listen {ref.name}")
        return Handle(ref.name, events)

    return start_pod


def run_enroller(enroller: Enroller, script: Callable[[], object] | None = None) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(enroller.run)
            if script is not None:
                script()
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_listeners_open_before_capture_and_capture_goes_before_listeners(tmp_path: Path) -> None:
    events: list[str] = []
    a = pod(tmp_path, "a")
    pods = Pods([a])
    enroller = Enroller(pods, Redirector(events), starter(events), resync_interval=0.01)

    def leave() -> None:
        pods.want.clear()
        pods.callbacks[0]()

    run_enroller(enroller, leave)
    assert events == ["listen a", "install a [15001, 15006, 15008]", "remove a", "stop a"]
    assert enroller.enrolled == {}


def test_leftover_capture_of_a_pod_that_left_the_mesh_is_removed_at_start(tmp_path: Path) -> None:
    events: list[str] = []
    gone, vanished = pod(tmp_path, "gone"), pod(tmp_path, "vanished", netns=False)
    redirector = Redirector(events)
    redirector.captured = {"gone", "vanished"}
    run_enroller(Enroller(Pods([], [gone, vanished]), redirector, starter(events)))
    assert events == ["remove gone"]  # a pod whose netns is gone has nothing left to clean


def test_capture_left_by_an_earlier_agent_is_adopted(tmp_path: Path) -> None:
    events: list[str] = []
    redirector = Redirector(events)
    redirector.captured = {"a"}
    enroller = Enroller(Pods([pod(tmp_path, "a")]), redirector, starter(events))
    run_enroller(enroller)
    assert "uid-a" in enroller.enrolled and redirector.captured == {"a"}


def test_a_failed_capture_closes_the_listeners_and_is_retried(tmp_path: Path) -> None:
    events: list[str] = []
    redirector = Redirector(events, fail={"a": RedirectError("iptables-restore failed: no chain")})
    enroller = Enroller(Pods([pod(tmp_path, "a")]), redirector, starter(events), resync_interval=60)
    seen: list[dict[str, str]] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(enroller.run)
            seen.append(dict(enroller.failures))
            await enroller.reconcile()  # what the next pass does
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == [{"uid-a": "iptables-restore failed: no chain"}]
    assert events == ["listen a", "stop a", "listen a", "install a [15001, 15006, 15008]"]
    assert "uid-a" in enroller.enrolled and enroller.failures == {}


def test_a_pod_that_vanishes_during_enrollment_is_skipped_with_a_reason(tmp_path: Path) -> None:
    events: list[str] = []
    enroller = Enroller(Pods([pod(tmp_path, "a"), pod(tmp_path, "b")]), Redirector(events),
                        starter(events, fail={"a": NetnsError("network namespace 'x' does not exist")}),
                        resync_interval=60)
    run_enroller(enroller)
    assert "could not open listeners: network namespace 'x' does not exist" in enroller.failures["uid-a"]
    assert list(enroller.enrolled) == ["uid-b"]


def test_a_pod_without_its_netns_yet_waits(tmp_path: Path) -> None:
    events: list[str] = []
    enroller = Enroller(Pods([pod(tmp_path, "a", netns=False)]), Redirector(events), starter(events))
    run_enroller(enroller)
    assert events == [] and "does not exist (yet)" in enroller.failures["uid-a"]


def test_stopping_the_agent_releases_nothing(tmp_path: Path) -> None:
    events: list[str] = []
    redirector = Redirector(events)
    run_enroller(Enroller(Pods([pod(tmp_path, "a")]), redirector, starter(events)))
    assert not any(e.startswith(("remove", "stop")) for e in events)
    assert redirector.captured == {"a"}


def test_a_changed_pod_is_released_and_enrolled_again(tmp_path: Path) -> None:
    events: list[str] = []
    a = pod(tmp_path, "a")
    pods = Pods([a])
    enroller = Enroller(pods, Redirector(events), starter(events), resync_interval=0.01)

    def move() -> None:
        pods.want["uid-a"] = PodRef(a.uid, a.namespace, a.name, "10.244.1.9", a.identity, a.netns)
        pods.callbacks[0]()

    run_enroller(enroller, move)
    assert events == ["listen a", "install a [15001, 15006, 15008]", "remove a", "stop a", "listen a",
                      "install a [15001, 15006, 15008]"]
    assert enroller.enrolled["uid-a"][0].ip == "10.244.1.9"


def test_the_iptables_redirector_is_a_redirector() -> None:
    r: RedirectorSeam = IptablesRedirector()
    assert r.mode == "iptables"
