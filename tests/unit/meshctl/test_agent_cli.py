"""`meshctl agent workloads|certs|policies NODE` against a real admin endpoint on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import queue
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import meshctl.agent as agent_cli
from bench.ports import free_port
from mesh.proto import discovery_pb2 as pb
from mesh.serve.server import serve_http
from meshctl.main import main
from nodeagent.admin import AdminView
from nodeagent.state import AUTHORIZATION, WORKLOAD, MeshState


@dataclasses.dataclass(frozen=True)
class Cert:
    identity: str
    state: str
    not_after: str | None
    next_attempt_in: float
    failures: int
    last_error: str | None


def make_state() -> MeshState:
    s = MeshState()
    sleep = pb.Workload(uid="default/sleep-1", name="sleep-1", namespace="default", addresses=["10.244.1.2"],
                        node="node-1", service_account="sleep", tunnel_protocol=pb.HBONE)
    rev = pb.Workload(uid="bookinfo/reviews-1", name="reviews-1", namespace="bookinfo", addresses=["10.244.1.3"],
                      node="node-1", service_account="reviews", tunnel_protocol=pb.HBONE,
                      waypoint=pb.GatewayAddress(name="waypoint", namespace="bookinfo"))
    web = pb.Workload(uid="prod/web-1", name="web-1", namespace="prod", addresses=["10.244.2.2"], node="node-2")
    s.apply(WORKLOAD, {w.uid: w for w in (sleep, rev, web)}, [], version="4")
    strict = pb.Authorization(name="converted_peer_authentication_default", namespace="istio-system",
                              scope=pb.GLOBAL, action=pb.DENY, rules=[pb.Rule()])
    sel = pb.Authorization(name="allow-sleep", namespace="bookinfo", scope=pb.WORKLOAD_SELECTOR,
                           selector={"app": "reviews"}, action=pb.ALLOW, dry_run=True)
    s.apply(AUTHORIZATION, {"a": strict, "b": sel}, [])
    return s


CERTS = [
    Cert("spiffe://cluster.local/ns/default/sa/sleep", "valid", "2030-01-01T00:00:00+00:00", 3600.0, 0, None),
    Cert("spiffe://cluster.local/ns/bookinfo/sa/reviews", "backoff", None, 12.0, 3, "CA unreachable"),
]


@pytest.fixture
def admin_port() -> Iterator[int]:
    ports: queue.Queue[int] = queue.Queue()
    handles: dict[str, Any] = {}

    def run() -> None:
        async def serve() -> None:
            async with trio.open_nursery() as nursery:
                handles["scope"] = nursery.cancel_scope
                handles["token"] = trio.lowlevel.current_trio_token()
                admin = AdminView(make_state(), lambda: CERTS, node="node-1")
                ports.put(await nursery.start(partial(serve_http, admin.handle, "127.0.0.1", 0, name="admin")))

        trio.run(serve)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield ports.get(timeout=5)
    handles["token"].run_sync_soon(handles["scope"].cancel)
    thread.join(5)


def meshctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_workloads_table(admin_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = meshctl(capsys, "agent", "workloads", "node-1", "--admin-address", f"127.0.0.1:{admin_port}")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "2 workloads on the agent of node-1"
    assert lines[1].split() == ["NAMESPACE", "NAME", "ADDRESS", "NODE", "PROTOCOL", "WAYPOINT", "IDENTITY", "STATUS",
                                "CAPTURE"]
    assert lines[2].split() == ["bookinfo", "reviews-1", "10.244.1.3", "node-1", "HBONE", "bookinfo/waypoint",
                                "spiffe://cluster.local/ns/bookinfo/sa/reviews", "HEALTHY", "-"]
    assert lines[3].split()[:6] == ["default", "sleep-1", "10.244.1.2", "node-1", "HBONE", "-"]
    assert "web-1" not in out


def test_workloads_all_and_json(admin_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"127.0.0.1:{admin_port}"
    code, out, _ = meshctl(capsys, "agent", "workloads", "node-1", "--admin-address", addr, "--all")
    assert code == 0 and "3 workloads known to" in out
    web = next(line for line in out.splitlines() if "web-1" in line)
    assert web.split()[3:6] == ["node-2", "TCP", "-"]
    code, out, _ = meshctl(capsys, "agent", "workloads", "node-1", "--admin-address", addr, "-o", "json")
    assert code == 0
    assert {w["uid"] for w in json.loads(out)["workloads"]} == {"default/sleep-1", "bookinfo/reviews-1", "prod/web-1"}


def test_certs_table(admin_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = meshctl(capsys, "agent", "certs", "node-1", "--admin-address", f"127.0.0.1:{admin_port}")
    assert code == 0
    assert out.startswith("2 certificate(s) held by the agent of node-1\n")
    assert "IDENTITY" in out and "NOT AFTER" in out and "NEXT RENEWAL" in out
    row = next(line for line in out.splitlines() if "/sa/sleep" in line)
    assert "VALID" in row and "2030-01-01 00:00:00Z (in " in row and "in 1h0m" in row
    assert "reviews: CA unreachable (3 failure(s))" in out


def test_policies_table(admin_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = meshctl(capsys, "agent", "policies", "node-1", "--admin-address", f"127.0.0.1:{admin_port}")
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines()[2:]}
    strict = rows["converted_peer_authentication_default"]
    assert "DENY" in strict and "mesh" in strict and "bookinfo/reviews-1, default/sleep-1" in strict
    sel = rows["allow-sleep"]
    assert "ALLOW (dry-run)" in sel and "selector app=reviews" in sel and "none" in sel
    assert sel.rstrip().endswith("-")  # no workload on node-1 carries app=reviews


def test_not_answering_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, out, err = meshctl(capsys, "agent", "certs", "node-1", "--admin-address", f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert err == (f"meshctl: node agent at 127.0.0.1:{port} is not answering on 127.0.0.1:{port}: "
                   "is it running? (`meshctl cluster status`)\n")


def test_bad_admin_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = meshctl(capsys, "agent", "certs", "node-1", "--admin-address", "nonsense")
    assert code == 1 and "expected HOST:PORT" in err
    assert agent_cli.parse_address("[::1]:15000") == ("::1", 15000)


def write_cluster(root: Path) -> None:
    plan = {"nodes": [{"name": "node-1", "netns": "amb.demo.node.node-1"},
                      {"name": "node-2", "netns": "amb.demo.node.node-2"}]}
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "cluster.json").write_text(json.dumps({"plan": plan, "phase": "ready"}))


def test_default_connects_from_the_node_namespace(admin_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write_cluster(tmp_path)
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(agent_cli, "ADMIN_PORT", admin_port)
    entered: list[str] = []

    @contextlib.contextmanager
    def fake_entered(name: str) -> Iterator[None]:
        entered.append(name)
        yield

    monkeypatch.setattr(agent_cli.netns, "entered", fake_entered)
    code, out, _ = meshctl(capsys, "agent", "workloads", "node-1", "--cluster", "demo")
    assert code == 0 and "sleep-1" in out
    assert entered == ["amb.demo.node.node-1"]

    monkeypatch.setattr(agent_cli, "ADMIN_PORT", free_port())
    code, _, err = meshctl(capsys, "agent", "workloads", "node-2")
    assert code == 1
    assert err == ("meshctl: node agent on node-2 is not answering on 127.0.0.1:"
                   f"{agent_cli.ADMIN_PORT}: is it running? (`meshctl cluster status`)\n")


def test_unknown_node_and_missing_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    write_cluster(tmp_path)
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    code, _, err = meshctl(capsys, "agent", "certs", "node-9")
    assert code == 1 and err == "meshctl: node 'node-9' is not in cluster 'demo' (nodes: node-1, node-2)\n"
    code, _, err = meshctl(capsys, "agent", "certs", "node-1")  # its namespace does not exist here
    assert code == 1 and err.startswith("meshctl: cannot enter the network namespace of the node agent on node-1: ")


def test_no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MESH_CLUSTER", raising=False)
    code, _, err = meshctl(capsys, "agent", "policies", "node-1")
    assert code == 1 and "no cluster is up" in err


def test_renderers_on_empty_answers() -> None:
    assert agent_cli.render_workloads({"node": "n", "workloads": []}).endswith("(use --all to list every workload "
                                                                               "it knows)")
    assert agent_cli.render_certs({"node": "n", "certificates": []}) == "0 certificate(s) held by the agent of n"
    assert agent_cli.render_policies({"policies": []}) == "0 authorization policies known to the agent of ?"


@pytest.mark.parametrize(("seconds", "text"), [(59, "in 0m59s"), (3660, "in 1h1m"), (90000, "in 1d1h"),
                                               (-120, "2m0s ago")])
def test_delta(seconds: float, text: str) -> None:
    assert agent_cli._delta(seconds) == text


def test_when_formats_times() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    assert agent_cli._when("2030-01-01T02:00:00+00:00", now) == "2030-01-01 02:00:00Z (in 2h0m)"
    assert agent_cli._when("garbage", now) == "garbage"
    assert agent_cli._when(None, now) == "-"


def test_help_lists_the_three_views(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    out = capsys.readouterr().out
    assert "workloads" in out and "certs" in out and "policies" in out


def test_log_level_through_the_admin_endpoint(admin_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"127.0.0.1:{admin_port}"
    root = logging.getLogger()
    before = root.level
    try:
        code, out, _ = meshctl(capsys, "agent", "log-level", "node-1", "error,nodeagent.cli-test=debug",
                               "--admin-address", addr)
        assert (code, out) == (0, "log level of the node agent on node-1: error (nodeagent.cli-test=debug)\n")
        assert logging.getLogger("nodeagent.cli-test").level == logging.DEBUG and root.level == logging.ERROR
        code, _, err = meshctl(capsys, "agent", "log-level", "node-1", "error,x=chatty", "--admin-address", addr)
        assert code == 1 and err == "meshctl: log level 'x=chatty': unknown log level 'chatty': use one of debug, " \
                                    "info, warning, error\n"
        code, _, err = meshctl(capsys, "agent", "log-level", "node-1", "debug", "--reset", "--admin-address", addr)
        assert code == 1 and "not both" in err
        code, out, _ = meshctl(capsys, "agent", "log-level", "node-1", "--reset", "--admin-address", addr)
        assert code == 0 and "(nodeagent.cli-test" not in out
        assert logging.getLogger("nodeagent.cli-test").level == logging.NOTSET
    finally:
        root.setLevel(before)
        logging.getLogger("nodeagent.cli-test").setLevel(logging.NOTSET)


def test_certs_show_serial_and_not_before(capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    out = agent_cli.render_certs({"node": "n", "certificates": [
        {"identity": "spiffe://cluster.local/ns/a/sa/b", "state": "valid", "serial": "1f2e",
         "not_before": "2029-12-31T23:00:00+00:00", "not_after": "2030-01-02T00:00:00+00:00",
         "next_attempt_in": 60.0}]}, now)
    row = out.splitlines()[2].split()
    assert row[:4] == ["spiffe://cluster.local/ns/a/sa/b", "VALID", "1f2e", "2029-12-31"]
    assert "(1h0m ago)" in out and "(in 1d0h)" in out
