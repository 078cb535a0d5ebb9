"""Item 14 (the control plane's parts): smaller holes.

- The discovery client and server keep the connection alive with gRPC keepalive pings, so a silent
  partition (no FIN, no RST) ends the stream and the client reconnects instead of waiting forever.
- `write_atomic` makes the rename itself durable: it fsyncs the directory.
- A malformed store file is a clear error naming the file and what is wrong (not a KeyError).
- An apply whose document `index` is not a number is a 400 that says so (not a 500).
- `SecretManager` forgets the certificates of identities nobody asked for for a while, and holds at most
  a bounded number of identities.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ca.authority import CertificateAuthority
from ca.csr import check_csr
from ca.server import SERVER_OPTIONS
from controlplane.app import ControlPlaneThread
from controlplane.config.apiserver import ApiServer
from controlplane.config.store import STATE_FILE, Store, StoreError
from controlplane.discovery.source import MemorySource
from controlplane.options import STORE_DIR, Options
from mesh import files
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.manager import SecretManager
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo

pytestmark = pytest.mark.timeout(60)


# ---- keepalive -----------------------------------------------------------------------------------------

class Blackhole:
    """A TCP forwarder to `target` that can go silent: after `silence()`, nothing is forwarded either way
    and no connection is closed (a partition, as a dropped route or a dead peer looks)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self.silent.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_a_silent_partition_ends_the_discovery_stream(tmp_path: Path) -> None:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
                            MemorySource([pb.Workload(uid="default/a", name="a", namespace="default")]))
    running = cp.start()
    hole = Blackhole(("127.0.0.1", running.grpc_port))
    token = running.extras["token_issuer"].mint_node_token("n1")
    cfg = ClientConfig(target=f"127.0.0.1:{hole.port}", node=NodeInfo(id="", role="nodeagent", node="n1"),
                       subscriptions={rs.WORKLOAD: None}, root_pem=running.root_pem,
                       metadata=(("authorization", f"Bearer {token}"),), keepalive_time=1.0, keepalive_timeout=1.0)
    try:
        with XdsClient(cfg) as client:
            assert client.wait_synced(10)
            hole.silent.set()
            # Before: the stream stayed "connected" for ever.  Now the keepalive ping goes unanswered.
            assert client.wait_for(lambda c: not c.connected, 10), "the client never noticed the partition"
    finally:
        hole.close()
        cp.stop()


def test_client_and_server_keepalive_agree() -> None:
    server = dict(SERVER_OPTIONS)
    cfg = ClientConfig(target="x:1", node=NodeInfo(id="x"))
    client = XdsClient(cfg).stream_options()  # the data plane's client is mesh.grpcwire, not grpcio
    assert server["grpc.keepalive_time_ms"] > 0 and server["grpc.keepalive_timeout_ms"] > 0
    assert client["keepalive_time"] > 0 and client["keepalive_timeout"] > 0
    # newer gRPC times a keepalive ping out with ping_timeout_ms
    assert server["grpc.http2.ping_timeout_ms"] == server["grpc.keepalive_timeout_ms"]
    assert client["keepalive_timeout"] * 1000 == server["grpc.keepalive_timeout_ms"]
    assert client["max_message"] <= server["grpc.max_send_message_length"]
    # The server must accept the client's pings, or it would close the connection for pinging too often.
    assert client["keepalive_time"] * 1000 >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1


# ---- write_atomic ----------------------------------------------------------------------------------------

def test_write_atomic_fsyncs_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    files.write_atomic(tmp_path / "state.json", b"{}")
    assert synced == [False, True]  # the file, then the directory that holds its new name
    assert (tmp_path / "state.json").read_bytes() == b"{}"


# ---- a malformed store file -------------------------------------------------------------------------------

GOOD = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "resourceVersion": "1"}}


@pytest.mark.parametrize(("content", "says"), [
    ({"format": 1, "version": 1, "resources": {"a": 1}}, "'resources' must be a list"),
    ({"format": 1, "version": "one", "resources": []}, "'version' must be a non-negative integer"),
    ({"format": 1, "version": 1, "resources": [GOOD, "text"]}, "resources[1]"),
    ({"format": 1, "version": 1, "resources": [{"kind": "Namespace"}]}, "metadata.name"),
    ({"format": 1, "version": 1, "resources": [{"apiVersion": "v1", "kind": "Gizmo", "metadata": {"name": "x"}}]},
     "unknown kind"),
    ({"format": 1, "version": 1, "resources": [GOOD, GOOD]}, "saved twice"),
])
def test_a_malformed_store_file_is_a_clear_error(tmp_path: Path, content: dict[str, Any], says: str) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps(content))
    with pytest.raises(StoreError) as info:
        Store(tmp_path)
    assert str(tmp_path / STATE_FILE) in str(info.value) and says in str(info.value)


def test_the_control_plane_says_which_file_is_malformed(tmp_path: Path) -> None:
    store = tmp_path / "controlplane" / STORE_DIR
    store.mkdir(parents=True)
    (store / STATE_FILE).write_text(json.dumps({"format": 1, "version": 1, "resources": [{"kind": "Pod"}]}))
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    with pytest.raises(StoreError, match=STATE_FILE):
        cp.start()


# ---- the apply API ------------------------------------------------------------------------------------------

@pytest.fixture
def api_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "api.sock"
    with ApiServer(Store(), path):
        yield path


def _post(path: Path, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"POST /apply HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        response = http.client.HTTPResponse(s)  # type: ignore[arg-type]
        response.begin()
        return response.status, json.loads(response.read())


@pytest.mark.parametrize("index", ["abc", -1, 1.5, True, [1]])
def test_a_bad_document_index_is_a_400(api_socket: Path, index: Any) -> None:
    status, reply = _post(api_socket, {"documents": [{"source": "x.yaml", "index": index, "body": GOOD}]})
    assert status == 400, reply
    assert "documents[0].index" in reply["error"] and "positive integer" in reply["error"]


def test_a_numeric_string_index_is_still_accepted(api_socket: Path) -> None:
    status, reply = _post(api_socket, {"documents": [{"source": "x.yaml", "index": "3", "body": GOOD}]})
    assert status == 200, reply


# ---- the secret manager forgets ------------------------------------------------------------------------------

class LocalSigner:
    """Signs with a CA in this process (the secret manager's `CertificateSigner`)."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority

    def create_certificate(self, csr_pem: str, *, ttl_seconds: int = 0,
                           impersonate: SpiffeId | None = None) -> list[str]:
        csr = check_csr(csr_pem)
        return self.authority.sign_workload(csr.public_key, csr.identity,
                                            datetime.timedelta(seconds=ttl_seconds or 3600)).pems


def ident(name: str) -> SpiffeId:
    return SpiffeId("cluster.local", "default", name)


def test_the_secret_manager_forgets_identities_nobody_asks_for(tmp_path: Path) -> None:
    authority = CertificateAuthority.load_or_create(tmp_path / "ca")
    manager = SecretManager(LocalSigner(authority), authority.root_pem, impersonate=True, ttl_seconds=2,
                            forget_after=1.0, max_identities=3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            with trio.fail_after(20):
                await manager.get(ident("gone"))
                await manager.get(ident("used"))
                # "used" keeps being used (a connection per 100 ms); "gone" left the node, nobody asks.
                while ident("gone") in manager.identities() or manager.generation(ident("used")) < 2:
                    manager.server_context(ident("used"))
                    await trio.sleep(0.1)
                assert manager.identities() == [ident("used")]
                assert manager.generation(ident("used")) >= 2  # renewed meanwhile
                # Bounded: past `max_identities`, the least recently used identity goes first.
                for name in ("b", "c", "d"):
                    await manager.get(ident(name))
                assert len(manager.identities()) == 3 and ident("used") not in manager.identities()
            nursery.cancel_scope.cancel()

    trio.run(main)
