"""A change of a waypoint Gateway's infrastructure annotations, or of an ingress Gateway's revision, rolls
its pod (`localcluster.waypoints`): what differs between the wanted pod and the running one, the new pod's
name, the gateway a recorded pod belongs to, what a registered pod's command line says it runs with, and
the command line the controller starts a pod with (read by the waypoint's own parser)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from localcluster import spec
from localcluster.plan import make_plan
from localcluster.waypoints import (
    DRAIN_ANNOTATION,
    ENGINE_ANNOTATION,
    GATEWAY_NAME_LABEL,
    ROOT_CERT,
    TOKEN,
    WORKERS_ANNOTATION,
    WaypointController,
    WaypointPod,
    desired,
    gateway_of,
    pod_name_for,
    roll_reasons,
    runs_as_wanted,
    template_hash,
)
from mesh.api.kinds_gateway import waypoint_gateway
from waypoint.main import parse_args

BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo" / "cluster.yaml"


def wanted(**annotations: str) -> WaypointPod:
    body = waypoint_gateway("bookinfo")
    if annotations:
        names = {"workers": WORKERS_ANNOTATION, "drain": DRAIN_ANNOTATION, "engine": ENGINE_ANNOTATION}
        body["spec"]["infrastructure"] = {"annotations": {names[k]: v for k, v in annotations.items()}}
    return desired([body])["bookinfo/waypoint"]


def recorded(workers: int = 1, drain: float = 5.0, engine: str = "uvloop") -> dict[str, Any]:
    return {"name": "waypoint", "namespace": "bookinfo", "workers": workers, "engine": engine, "drainSeconds": drain}


def test_a_pod_that_runs_as_wanted_is_left_alone() -> None:
    assert roll_reasons(wanted(), recorded()) == []
    assert roll_reasons(wanted(workers="2", drain="3"), recorded(2, 3.0)) == []


def test_a_changed_annotation_rolls_the_pod() -> None:
    assert roll_reasons(wanted(workers="2"), recorded()) == ["--workers 1 -> 2"]
    assert roll_reasons(wanted(drain="2.5"), recorded()) == ["--drain-seconds 5 -> 2.5"]
    assert roll_reasons(wanted(workers="3", drain="0"), recorded(2, 5.0)) == ["--workers 2 -> 3",
                                                                              "--drain-seconds 5 -> 0"]
    # Removing the annotation asks for the default again: that is a change too.
    assert roll_reasons(wanted(), recorded(2)) == ["--workers 2 -> 1"]


def test_a_changed_engine_rolls_the_pod() -> None:
    assert roll_reasons(wanted(engine="trio"), recorded(engine="trio")) == []
    assert roll_reasons(wanted(engine="trio"), recorded()) == ["--engine uvloop -> trio"]
    assert roll_reasons(wanted(workers="2", engine="trio"), recorded()) == ["--workers 1 -> 2",
                                                                           "--engine uvloop -> trio"]
    # Removing the annotation asks for the waypoint's default again.
    assert roll_reasons(wanted(), recorded(engine="trio")) == ["--engine trio -> uvloop"]
    # A bad value (logged) means the default.
    assert roll_reasons(wanted(engine="epoll"), recorded()) == []
    assert roll_reasons(wanted(engine="epoll"), recorded(engine="trio")) == ["--engine trio -> uvloop"]


def test_a_bad_annotation_asks_for_the_default() -> None:
    """A value the controller refuses (logged) means the default: no roll away from a pod running it."""
    assert roll_reasons(wanted(workers="0"), recorded()) == []
    assert roll_reasons(wanted(workers="lots"), recorded(2)) == ["--workers 2 -> 1"]


def test_a_pod_an_older_controller_started_is_not_rolled_for_what_its_record_lacks() -> None:
    assert roll_reasons(wanted(workers="2"), {"name": "waypoint", "namespace": "bookinfo"}) == []
    assert roll_reasons(wanted(engine="trio"), {k: v for k, v in recorded().items() if k != "engine"}) == []
    ingress = dataclasses.replace(wanted(), revision="b" * 16)
    assert roll_reasons(ingress, recorded()) == []


def test_a_new_revision_rolls_the_pod() -> None:
    """An ingress Gateway's listeners or certificates changed: rolled as a flag change is, not replaced."""
    ingress = dataclasses.replace(wanted(), revision="b" * 16)
    assert roll_reasons(ingress, {**recorded(), "revision": "b" * 16}) == []
    assert roll_reasons(ingress, {**recorded(), "revision": "a" * 16}) == [f"revision {'a' * 16} -> {'b' * 16}"]
    assert roll_reasons(wanted(workers="2"), {**recorded(), "revision": ""}) == ["--workers 1 -> 2"]
    # the new pod's name follows the revision it runs
    assert template_hash(ingress) != template_hash(dataclasses.replace(ingress, revision="c" * 16))


def test_the_gateway_a_recorded_pod_belongs_to() -> None:
    labels = {GATEWAY_NAME_LABEL: "waypoint"}
    assert gateway_of({"name": "waypoint-abcde", "namespace": "bookinfo", "labels": labels}) == "bookinfo/waypoint"
    assert gateway_of({"name": "waypoint", "namespace": "bookinfo"}) == "bookinfo/waypoint"


def test_the_new_pod_is_named_after_the_gateway_when_it_can_be() -> None:
    wp = wanted(workers="2")
    assert pod_name_for(wp, set()) == "waypoint"
    rolled = pod_name_for(wp, {"waypoint"})
    assert rolled == f"waypoint-{template_hash(wp)}" and len(template_hash(wp)) == 5
    assert pod_name_for(wp, {"waypoint", rolled}) == f"{rolled}-1"  # never a name in use
    assert pod_name_for(wp, {rolled}) == "waypoint"  # the next roll takes the gateway's name back


def test_the_template_hash_follows_the_flags() -> None:
    assert template_hash(wanted(workers="2")) == template_hash(wanted(workers="2"))
    assert len({template_hash(wanted()), template_hash(wanted(workers="2")), template_hash(wanted(drain="3")),
                template_hash(wanted(engine="trio"))}) == 4


def test_what_the_registered_command_line_runs() -> None:
    command = ["python", "-m", "waypoint.main", "--name", "waypoint", "--drain-seconds", "5", "--workers", "1"]
    assert runs_as_wanted(wanted(), command)
    assert not runs_as_wanted(wanted(workers="2"), command)
    assert not runs_as_wanted(wanted(drain="3"), command)
    assert runs_as_wanted(wanted(workers="2"), [*command[:-1], "2"])
    assert runs_as_wanted(wanted(workers="2"), ["wp"])  # a pod that does not say is not ours to judge
    with_engine = [*command, "--engine", "uvloop"]
    assert runs_as_wanted(wanted(), with_engine) and runs_as_wanted(wanted(engine="trio"), command)
    assert not runs_as_wanted(wanted(engine="trio"), with_engine)
    assert runs_as_wanted(wanted(engine="trio"), [*command, "--engine", "trio"])


def test_the_pod_runs_with_the_gateways_flags(tmp_path: Path) -> None:
    """The command line the controller starts a pod with carries the Gateway's `--workers`, `--engine` and
    `--drain-seconds`, the waypoint's own parser reads them so, and it is what `runs_as_wanted` accepts."""
    plan = make_plan(dataclasses.replace(spec.load(BOOKINFO), name="t"))
    controller = WaypointController("t", plan, tmp_path, on_change=lambda c: None)
    own = tmp_path / "own"  # the pod's own directory, with what `_provide` puts there
    own.mkdir()
    (own / ROOT_CERT).write_text("")
    (own / TOKEN).write_text("")
    wp = wanted(workers="2", engine="trio", drain="3")
    argv = controller.command(wp, "node-1", own)
    assert argv[1:3] == ["-m", "waypoint.main"] and argv[argv.index("--engine") + 1] == "trio"
    opts = parse_args(argv[3:])
    assert (opts.workers, opts.engine, opts.drain_seconds, opts.node) == (2, "trio", 3.0, "node-1")
    assert runs_as_wanted(wp, argv) and not runs_as_wanted(wanted(workers="2", drain="3"), argv)
    # No annotation: the pod says the default engine, uvloop, which is the waypoint's own.
    default = controller.command(wanted(), "node-1", own)
    assert default[default.index("--engine") + 1] == "uvloop" == parse_args(default[3:]).engine


def test_a_roll_under_way_is_adopted_as_such(tmp_path: Path) -> None:
    """A controller started again in the middle of a roll (both pods in the cluster record) keeps the
    first as the gateway's pod and the second as its new pod, each with its own token file."""
    plan = make_plan(dataclasses.replace(spec.load(BOOKINFO), name="t"))
    controller = WaypointController("t", plan, tmp_path, on_change=lambda c: None)
    labels = {GATEWAY_NAME_LABEL: "waypoint"}
    old = {**recorded(), "labels": labels, "node": "node-1", "netns": "n1", "ip": "10.244.1.254"}
    new = {**recorded(2), "name": "waypoint-abcde", "labels": labels, "node": "node-2", "netns": "n2",
           "ip": "10.244.2.254"}
    controller.adopt("bookinfo/waypoint", old, {"name": "waypoint bookinfo/waypoint"})
    controller.adopt("bookinfo/waypoint-abcde", new, {"name": "waypoint bookinfo/waypoint-abcde"})
    assert controller.running["bookinfo/waypoint"]["pod"] is old
    assert controller.surging["bookinfo/waypoint"]["pod"] is new
    assert sorted(p.name for p in controller.tokens.files) == ["token", "token"]
    assert sorted(p.parent.name for p in controller.tokens.files) == ["waypoint", "waypoint-abcde"]
