"""`meshctl waypoint config -n NS [NAME]`: a real waypoint configuration (discovery resources through the
waypoint's own handler) served by the waypoint's admin view, read from inside a real network namespace
as the local cluster runs it, and printed as text, JSON and YAML."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from google.protobuf import json_format, struct_pb2

import meshctl.waypoint as waypoint_cli
from bench.ports import free_port
from mesh import netns
from mesh.proto import discovery_pb2 as pb
from mesh.serve.server import serve_http
from mesh.xds import resources as rs
from mesh.xds.client_state import Update
from meshctl.main import main
from waypoint.admin import AdminView
from waypoint.discovery import WaypointConfig

NS = "bookinfo"
REVIEWS = "reviews.bookinfo.svc.cluster.local"
IDENTITY = "spiffe://cluster.local/ns/bookinfo/sa/waypoint"


def update(type_url: str, resources: dict[str, Any]) -> Update:
    return Update(type_url=type_url, version="v", nonce="n", updated=resources, removed=(), resources=resources)


def l7(kind: int, name: str, spec: dict[str, Any]) -> pb.L7Config:
    s = struct_pb2.Struct()
    json_format.ParseDict(spec, s)
    return pb.L7Config(kind=kind, name=name, namespace=NS, api_version="networking.istio.io/v1",
                       waypoints=[f"{NS}/waypoint"], hostnames=[REVIEWS], spec=s)


def waypoint_dump() -> dict[str, Any]:
    """What the waypoint's `/config_dump` serves, built by the waypoint's own discovery handler."""
    cfg = WaypointConfig(f"{NS}/waypoint", lambda table: None)
    svc = pb.Service(name="reviews", namespace=NS, hostname=REVIEWS, vips=["10.96.0.11"],
                     ports=[pb.ServicePort(service_port=9080, target_port=9080, name="http")],
                     waypoint=pb.GatewayAddress(name="waypoint", namespace=NS))
    cfg.handle(update(rs.SERVICE, {f"{NS}/reviews": svc}))
    route = {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}
    rule = {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
    broken = {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": "lots"}]}]}
    cfg.handle(update(rs.L7_CONFIG, {"VirtualService/bookinfo/reviews": l7(pb.VIRTUAL_SERVICE, "reviews", route),
                                     "DestinationRule/bookinfo/reviews": l7(pb.DESTINATION_RULE, "reviews", rule),
                                     "VirtualService/bookinfo/broken": l7(pb.VIRTUAL_SERVICE, "broken", broken)}))
    return {"identity": IDENTITY, "synced": True, **cfg.summary()}


def serve_admin(name: str | None) -> Iterator[int]:
    """The waypoint admin view on 127.0.0.1 of network namespace `name` (None: this one)."""
    ports: list[int] = []
    ready = threading.Event()
    handle: dict[str, Any] = {}
    admin = AdminView(waypoint_dump, lambda: [], lambda: {}, name=f"{NS}/waypoint")

    def run() -> None:  # the whole thread, and so its listener, is in the namespace
        async def serve() -> None:
            async with trio.open_nursery() as nursery:
                handle["cancel"], handle["token"] = nursery.cancel_scope.cancel, trio.lowlevel.current_trio_token()
                ports.append(await nursery.start(partial(serve_http, admin.handle, "127.0.0.1", 0, name="admin")))
                ready.set()

        if name is None:
            trio.run(serve)
        else:
            with netns.entered(name):
                trio.run(serve)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield ports[0]
    finally:
        handle["token"].run_sync_soon(handle["cancel"])
        thread.join(5)


@pytest.fixture
def pod_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a network namespace")
    name = f"amb.gaptest.wp.{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def cluster(tmp_path: Path, pod_netns: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local cluster record naming the waypoint pod's namespace, and its admin served in there."""
    plan = {"nodes": [{"name": "node-1", "netns": "amb.gaptest.node-1"}],
            "pods": [{"name": "waypoint", "namespace": NS, "netns": pod_netns, "waypoint": True},
                     {"name": "reviews-v1", "namespace": NS, "netns": "amb.gaptest.reviews"}]}
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "cluster.json").write_text(json.dumps({"plan": plan, "phase": "ready"}))
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MESH_CLUSTER", raising=False)
    for port in serve_admin(pod_netns):
        monkeypatch.setattr(waypoint_cli, "ADMIN_PORT", port)
        yield "demo"


def meshctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_reads_the_waypoint_from_inside_its_pod_namespace(cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = meshctl(capsys, "waypoint", "config", "-n", NS, "--cluster", cluster)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["waypoint", f"{NS}/waypoint", "identity", IDENTITY]
    assert lines[1].startswith("configuration version 2, synced, 0 update(s) refused")
    assert lines[lines.index("SERVICES (clusters)") + 1].strip() == REVIEWS
    routes = lines.index("ROUTES")
    assert lines[routes + 1].split() == ["HOST", "ROUTE"] and lines[routes + 2].split() == [REVIEWS, f"{NS}/reviews"]
    assert lines[lines.index("DESTINATION RULES") + 1].strip() == REVIEWS
    assert lines[lines.index("AUTHORIZATION POLICIES") + 1].strip() == "(none)"
    refused = lines.index("REFUSED RESOURCES (left out of the configuration)")
    assert lines[refused + 2].split()[0] == "VirtualService/bookinfo/broken" and "weight" in lines[refused + 2]

    code, out, _ = meshctl(capsys, "waypoint", "config", "-n", NS, "waypoint", "-o", "json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(waypoint_dump()))
    code, out, _ = meshctl(capsys, "waypoint", "config", "-n", NS, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == json.loads(json.dumps(waypoint_dump()))


def test_not_a_waypoint_and_not_answering(cluster: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = meshctl(capsys, "waypoint", "config", "-n", NS, "reviews-v1")
    assert (code, out) == (1, "")
    assert err == (f"meshctl: no waypoint 'reviews-v1' in namespace {NS!r} (waypoints: {NS}/waypoint); "
                   "a node agent is nodeagent/NODE\n")
    code, _, err = meshctl(capsys, "waypoint", "config", "-n", "default")
    assert code == 1 and err.startswith("meshctl: no waypoint 'waypoint' in namespace 'default'")
    monkeypatch.setattr(waypoint_cli, "ADMIN_PORT", free_port())
    code, _, err = meshctl(capsys, "waypoint", "config", "-n", NS)
    assert code == 1 and err == (f"meshctl: waypoint {NS}/waypoint is not answering on 127.0.0.1:"
                                 f"{waypoint_cli.ADMIN_PORT}: is it running? (`meshctl cluster status`)\n")


def test_admin_address_enters_no_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    for port in serve_admin(None):
        code, out, err = meshctl(capsys, "waypoint", "config", "-n", NS, "--admin-address", f"127.0.0.1:{port}")
        assert (code, err) == (0, "") and f"  {REVIEWS}" in out.splitlines()
    code, _, err = meshctl(capsys, "waypoint", "config", "-n", NS, "--admin-address", "localhost")
    assert code == 1 and "--admin-address 'localhost': expected HOST:PORT" in err


def test_bad_arguments_say_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["waypoint", "config", "-n", NS, "-o", "xml"])
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["waypoint", "config"])
    assert "-n/--namespace" in capsys.readouterr().err


def test_render_of_an_empty_gateway_mode_dump() -> None:
    text = waypoint_cli.render_config({"waypoint": "istio-system/ingress", "version": 0, "synced": False,
                                       "ingress_routes": {"istio-system/web": ["web.example.com"]},
                                       "tracing": {"sampling": 1.0, "reporting": True, "telemetry": []}})
    lines = text.splitlines()
    assert "NOT synced with the control plane yet" in lines[1]
    assert lines[lines.index("INGRESS ROUTES") + 2].split() == ["istio-system/web", "web.example.com"]
    assert lines[lines.index("ROUTES") + 1].strip() == "(none)" and "REFUSED" not in text
