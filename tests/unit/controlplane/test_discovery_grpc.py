"""The discovery server over real TLS gRPC on 127.0.0.1, with the real client library."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from bench.ports import free_port
from controlplane.app import ControlPlaneThread, Running
from controlplane.discovery.source import MemorySource
from controlplane.options import Options
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.client_state import Update
from mesh.xds.errors import Rejected
from mesh.xds.node import NodeInfo
from mesh.xds.trio_client import open_xds_client

pytestmark = pytest.mark.timeout(60)


def workload(name: str, ip: str, node: str = "n1") -> pb.Workload:
    return pb.Workload(
        uid=f"default/{name}", name=name, namespace="default", addresses=[ip], node=node, service_account="sa"
    )


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def source() -> MemorySource:
    return MemorySource([workload("a", "10.0.0.1")])


@pytest.fixture
def plane(tmp_path: Path, source: MemorySource) -> Iterator[tuple[ControlPlaneThread, Running]]:
    cp = ControlPlaneThread(
        Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"), source
    )
    running = cp.start()
    yield cp, running
    cp.stop()


def client_for(running: Running, port: int | None = None, name: str = "n1", handler=None) -> XdsClient:  # type: ignore[no-untyped-def]
    token = running.extras["token_issuer"].mint_node_token(name)  # discovery is authenticated
    cfg = ClientConfig(
        target=f"127.0.0.1:{port or running.grpc_port}",
        node=NodeInfo(id=f"nodeagent~{name}~{name}.", role="nodeagent", node=name),
        subscriptions={rs.WORKLOAD: None, rs.SERVICE: None},
        root_pem=running.root_pem,
        metadata=(("authorization", f"Bearer {token}"),),
        backoff_initial=0.05,
        backoff_max=0.3,
    )
    return XdsClient(cfg, handler)


def ips(client: XdsClient) -> dict[str, list[str]]:
    return {n: list(m.addresses) for n, m in client.resources(rs.WORKLOAD).items()}  # type: ignore[attr-defined]


def test_tls_add_change_remove(plane: tuple[ControlPlaneThread, Running], source: MemorySource) -> None:
    _, running = plane
    assert running.root_pem is not None
    with client_for(running) as c:
        assert c.wait_synced(10)
        assert ips(c) == {"default/a": ["10.0.0.1"]}
        source.put(workload("b", "10.0.0.2"))
        assert c.wait_for(lambda c: "default/b" in ips(c), 10)
        source.put(workload("a", "10.0.0.9"))
        assert c.wait_for(lambda c: ips(c).get("default/a") == ["10.0.0.9"], 10)
        source.remove(rs.WORKLOAD, "default/b")
        assert c.wait_for(lambda c: "default/b" not in ips(c), 10)
        version = running.discovery.version
        assert c.wait_for(lambda c: c.acked_version(rs.WORKLOAD) == version, 10)


def test_nack_is_reported_by_proxy_status(
    plane: tuple[ControlPlaneThread, Running], source: MemorySource, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshctl.main import main as meshctl

    _, running = plane

    def refuse_bad(update: Update) -> None:
        for msg in update.updated.values():
            if "bad" in list(msg.addresses):  # type: ignore[attr-defined]
                raise Rejected("workload default/a: address 'bad' is not an IP")

    with client_for(running, handler=refuse_bad) as c:
        assert c.wait_synced(10)
        source.put(workload("a", "bad"))
        assert c.wait_for(lambda c: c.nacks == 1, 10)
        assert ips(c) == {"default/a": ["10.0.0.1"]}  # still the last good configuration
        sock = tmp_path / "controlplane" / "debug.sock"
        capsys.readouterr()
        assert meshctl(["proxy-status", "--socket", str(sock)]) == 0
        out = capsys.readouterr().out
        assert "nodeagent~n1~n1." in out and "NACK" in out and "is not an IP" in out
        assert meshctl(["proxy-status", "--socket", str(sock), "-o", "json"]) == 0
        data = json.loads(capsys.readouterr().out)
        nack = data["clients"][0]["types"][rs.WORKLOAD]["nack"]
        assert nack["names"] == ["default/a"]
        # An unrelated change does not resend the rejected version; a fix clears the NACK.
        source.put(workload("c", "10.0.0.3"))
        assert c.wait_for(lambda c: "default/c" in ips(c), 10)
        assert c.nacks == 1
        source.put(workload("a", "10.0.0.4"))
        assert c.wait_for(lambda c: ips(c).get("default/a") == ["10.0.0.4"], 10)
        assert eventually(lambda: running.discovery.connections()["clients"][0]["types"][rs.WORKLOAD]["nack"] is None)


def test_restart_resume_keeps_last_good_config(tmp_path: Path) -> None:
    port = free_port()
    opts = Options(state_dir=tmp_path, grpc_listen=f"127.0.0.1:{port}", metrics_listen="127.0.0.1:0")
    source = MemorySource([workload("a", "10.0.0.1"), workload("b", "10.0.0.2")])
    cp = ControlPlaneThread(opts, source)
    running = cp.start()
    updates: list[Update] = []
    with client_for(running, handler=updates.append) as c:
        assert c.wait_synced(10)
        cp.stop()
        assert c.wait_for(lambda c: not c.connected, 10)
        assert sorted(ips(c)) == ["default/a", "default/b"]  # served while the control plane is away
        # Changed while away: b removed, c added.  Same CA directory, so the same root.
        source.remove(rs.WORKLOAD, "default/b", quiet=True)
        source.put(workload("c", "10.0.0.3"), quiet=True)
        cp2 = ControlPlaneThread(opts, source)
        running2 = cp2.start()
        try:
            assert running2.root_pem == running.root_pem
            assert c.wait_for(lambda c: c.connected and sorted(ips(c)) == ["default/a", "default/c"], 15)
            assert c.connects == 2
            # Resumed: only the difference was sent on the new stream.
            after = [u for u in updates[2:] if u.type_url == rs.WORKLOAD and (u.updated or u.removed)]
            assert [(sorted(u.updated), u.removed) for u in after] == [(["default/c"], ("default/b",))]
            # Resumed: the server knew the client already had default/a at its version.
            assert eventually(
                lambda: running2.discovery.connections()["clients"][0]["types"][rs.WORKLOAD]["resources"] == 2
            )
        finally:
            cp2.stop()


def test_metrics_endpoint(plane: tuple[ControlPlaneThread, Running], source: MemorySource) -> None:
    import urllib.request

    _, running = plane
    with client_for(running) as c:
        assert c.wait_synced(10)
        source.put(workload("z", "10.0.0.26"))
        assert c.wait_for(lambda c: "default/z" in ips(c), 10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
    assert "pilot_xds " in body or "pilot_xds{" in body
    assert 'pilot_xds_pushes_total{type="Workload"}' in body
    assert "pilot_proxy_convergence_time_bucket" in body
    assert "controlplane_rejected_applies_total" in body


def test_trio_client(plane: tuple[ControlPlaneThread, Running], source: MemorySource) -> None:
    _, running = plane
    cfg = client_for(running).config
    seen: list[str] = []

    async def handler(update: Update) -> None:
        await trio.sleep(0)
        if any("bad" in list(m.addresses) for m in update.updated.values()):  # type: ignore[attr-defined]
            raise Rejected("bad address")

    async def main() -> None:
        async with open_xds_client(cfg, handler) as client:
            assert await client.wait_synced(10)
            source.put(workload("t", "bad"))
            nacked = await trio.to_thread.run_sync(client.client.wait_for, lambda c: c.nacks == 1, 10)
            assert nacked
            source.put(workload("u", "10.0.0.30"))
            with trio.fail_after(10):
                async for update in client.updates:
                    seen.extend(update.updated)
                    if "default/u" in seen:
                        break
            assert "default/t" not in client.resources(rs.WORKLOAD)

    trio.run(main)
    assert "default/u" in seen and "default/t" not in seen
