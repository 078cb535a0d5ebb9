"""Item 13 (tokens): the tokens the control plane signs are short-lived, renewed by whoever holds them
before they expire, name the key that signed them, and stop working once that key is rotated out.

- Minted tokens live one hour by default (`--token-ttl`, the default and the most a request may ask
  for with `expirationSeconds`); they used to live 365 days.
- The local cluster refreshes token files as the kubelet refreshes projected service-account tokens
  (`localcluster.projected`: at 80% of a token's life, or at once when its key is no longer current);
  holders read the file again for every CA call and every discovery stream, and the control plane ends
  a discovery stream when the token that opened it expires, so a stream never outlives its credential.
  With tokens of a few seconds, a node agent's discovery and a waypoint's CA calls never fail.
- Every token carries its signing key's id (`kid`, the RFC 7638 thumbprint).  `meshctl ca
  rotate-token-key --overlap D` makes a new key current; the previous one is still accepted for D, then
  refused: rotating the key revokes every token it signed (at once with `--overlap 0`).  The retiring
  key survives a control plane restart.

Everything runs in process against the production assembly (`ControlPlaneThread`).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds

from ca.auth import key_id
from controlplane.app import ControlPlaneThread, Running
from controlplane.options import Options
from localcluster.projected import TokenFile, TokenRefresher
from mesh.api.client import ApiClient
from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.errors import CertificateRequestError
from mesh.secrets.svid import generate_key, make_csr
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo
from meshctl.main import main as meshctl

pytestmark = pytest.mark.timeout(120)

WAYPOINT = SpiffeId("cluster.local", "bookinfo", "waypoint")


class Plane:
    """A control plane on a state directory, and its apply API."""

    def __init__(self, state: Path, **options: Any) -> None:
        self.state = state
        self.cp = ControlPlaneThread(Options(state_dir=state, grpc_listen="127.0.0.1:0",
                                             metrics_listen="127.0.0.1:0", **options))
        self.running: Running = self.cp.start()
        self.socket = state / "controlplane" / "api.sock"
        self.api = ApiClient(self.socket, timeout=10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    def certificate(self, token: str | Any) -> list[str]:
        """A real CreateCertificate call for the waypoint's own identity with `token` (or a callable)."""
        assert self.running.root_pem is not None
        with CAClient(self.target, self.running.root_pem, token, timeout=5) as client:
            return client.create_certificate(make_csr(generate_key(), WAYPOINT))

    def stop(self) -> None:
        self.cp.stop()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path / "state")
    yield p
    p.stop()


def claims(token: str) -> dict[str, Any]:
    found: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return found


def test_tokens_the_control_plane_mints_are_short_lived(plane: Plane) -> None:
    for token in (plane.api.node_token("n1"), plane.api.workload_token(WAYPOINT)):
        c = claims(token)
        assert c["exp"] - c["iat"] == 3600, f"a token lives {c['exp'] - c['iat']}s"


def test_token_lifetime_is_configurable_and_capped(tmp_path: Path) -> None:
    p = Plane(tmp_path / "state", token_ttl=5)
    try:
        c = claims(p.api.node_token("n1"))
        assert c["exp"] - c["iat"] == 5
        c = claims(p.api.workload_token(WAYPOINT, expiration_seconds=2))
        assert c["exp"] - c["iat"] == 2  # a holder may ask for less ...
        c = claims(p.api.node_token("n1", expiration_seconds=86400))
        assert c["exp"] - c["iat"] == 5  # ... never for more than the control plane allows
    finally:
        p.stop()


def test_tokens_name_the_key_that_signed_them(plane: Plane) -> None:
    token = plane.api.node_token("n1")
    kid = jwt.get_unverified_header(token)["kid"]
    assert kid == plane.api.token_key_status()["current"]
    assert kid == key_id(plane.running.extras["token_issuer"].public_key)


class RecordingXdsClient(XdsClient):
    """The production discovery client, remembering how every stream ended."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config)
        self.endings: list[str] = []

    def _session(self) -> bool:
        answered = super()._session()
        self.endings.append(self.last_error)
        return answered


def test_short_lived_tokens_are_renewed_with_no_failed_call(tmp_path: Path) -> None:
    ttl = 4
    p = Plane(tmp_path / "state", token_ttl=ttl)
    node_token, waypoint_token = tmp_path / "node" / "token", tmp_path / "waypoint" / "token"
    kubelet = TokenRefresher(p.api, [TokenFile(node_token, node="n1"), TokenFile(waypoint_token, identity=WAYPOINT.uri)])
    assert sorted(kubelet.refresh()) == sorted([node_token, waypoint_token])  # the first tokens
    stop = threading.Event()

    def refresh_until_stopped() -> None:
        while not stop.wait(0.2):
            kubelet.refresh()

    refresher = threading.Thread(target=refresh_until_stopped, daemon=True)
    refresher.start()
    assert p.running.root_pem is not None
    cfg = ClientConfig(target=p.target, node=NodeInfo(id="", role="nodeagent", node="n1"),
                       subscriptions={rs.WORKLOAD: None}, root_pem=p.running.root_pem, backoff_initial=0.05,
                       metadata_fn=lambda: (("authorization", f"Bearer {node_token.read_text()}"),))
    failures: list[str] = []
    seen_tokens: set[str] = set()
    try:
        with RecordingXdsClient(cfg) as xds, CAClient(p.target, p.running.root_pem, waypoint_token.read_text,
                                                      timeout=5) as ca:
            assert xds.wait_synced(10)
            deadline = time.monotonic() + 3.5 * ttl
            while time.monotonic() < deadline:
                seen_tokens.add(waypoint_token.read_text())
                try:
                    ca.create_certificate(make_csr(generate_key(), WAYPOINT))
                except CertificateRequestError as exc:
                    failures.append(str(exc))
                time.sleep(0.25)
            assert xds.wait_synced(5)
            endings = list(xds.endings)
    finally:
        stop.set()
        refresher.join(5)
        p.stop()
    assert failures == []
    assert len(seen_tokens) >= 3, "the waypoint's token file was not renewed"
    # Each discovery stream ended when its token expired, and the next one opened with the renewed token.
    assert len(endings) >= 2, endings
    assert not [e for e in endings if "UNAUTHENTICATED" in e or "PERMISSION_DENIED" in e], endings


def test_a_rotated_out_key_is_refused_after_the_overlap(plane: Plane) -> None:
    old, old_node = plane.api.workload_token(WAYPOINT), plane.api.node_token("n1")
    old_kid = jwt.get_unverified_header(old)["kid"]
    status = plane.api.rotate_token_key(overlap_seconds=2)
    assert status["current"] != old_kid
    assert [k["kid"] for k in status["retiring"]] == [old_kid]
    new = plane.api.workload_token(WAYPOINT)
    assert jwt.get_unverified_header(new)["kid"] == status["current"]
    plane.certificate(old)  # during the overlap, both keys are accepted
    plane.certificate(new)
    time.sleep(2.5)
    with pytest.raises(CertificateRequestError) as refused:
        plane.certificate(old)
    assert refused.value.code == "UNAUTHENTICATED"
    assert "rotated out" in str(refused.value)
    plane.certificate(new)
    assert plane.api.token_key_status()["retiring"] == []
    # Discovery refuses the old key's node token as well: one verifier for the CA and discovery.
    assert stream_refusal(plane, old_node) == grpc.StatusCode.UNAUTHENTICATED
    assert stream_refusal(plane, plane.api.node_token("n1")) is None


def stream_refusal(plane: Plane, token: str) -> grpc.StatusCode | None:
    """How the control plane answers a discovery stream opened with `token` (None: it serves it)."""
    assert plane.running.root_pem is not None
    channel = grpc.secure_channel(plane.target, grpc.ssl_channel_credentials(plane.running.root_pem))
    try:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
        request = xds.DeltaDiscoveryRequest(type_url=rs.WORKLOAD)
        request.node.CopyFrom(NodeInfo(id="", role="nodeagent", node="n1").to_proto())
        call = stub.DeltaAggregatedResources(iter([request]), metadata=(("authorization", f"Bearer {token}"),),
                                             timeout=5)
        try:
            next(call)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        call.cancel()
        return None
    finally:
        channel.close()


def test_rotating_with_no_overlap_revokes_at_once(plane: Plane) -> None:
    old = plane.api.workload_token(WAYPOINT)
    assert meshctl(["ca", "rotate-token-key", "--overlap", "0s", "--socket", str(plane.socket)]) == 0
    with pytest.raises(CertificateRequestError) as refused:
        plane.certificate(old)
    assert refused.value.code == "UNAUTHENTICATED"
    plane.certificate(plane.api.workload_token(WAYPOINT))


def test_the_retiring_key_survives_a_restart(tmp_path: Path) -> None:
    p = Plane(tmp_path / "state")
    old = p.api.workload_token(WAYPOINT)
    p.api.rotate_token_key(overlap_seconds=600)
    p.stop()
    p = Plane(tmp_path / "state")
    try:
        retiring = p.api.token_key_status()["retiring"]
        assert [k["kid"] for k in retiring] == [jwt.get_unverified_header(old)["kid"]]
        until = datetime.datetime.fromisoformat(retiring[0]["until"])
        assert 500 < (until - datetime.datetime.now(datetime.UTC)).total_seconds() <= 600
        p.certificate(old)
    finally:
        p.stop()


def test_the_refresher_renews_at_once_after_a_rotation(plane: Plane, tmp_path: Path) -> None:
    """The kubelet's refresh: a token in its first 80% is kept, unless its key is no longer current."""
    path = tmp_path / "token"
    kubelet = TokenRefresher(plane.api, [TokenFile(path, node="n1")])
    assert kubelet.refresh() == [path]
    first = path.read_text()
    assert kubelet.refresh() == []
    assert path.read_text() == first
    plane.api.rotate_token_key(overlap_seconds=60)
    assert kubelet.refresh() == [path]
    assert jwt.get_unverified_header(path.read_text())["kid"] == plane.api.token_key_status()["current"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_token_key_rotates_on_a_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = Plane(tmp_path / "state", token_ttl=60, token_key_rotation=1)
    try:
        first = p.api.token_key_status()["current"]

        def rotated() -> bool:
            return bool(p.api.token_key_status()["current"] != first)

        deadline = time.monotonic() + 10
        while not rotated() and time.monotonic() < deadline:
            time.sleep(0.1)
        status = p.api.token_key_status()
        assert status["current"] != first
        assert first in [k["kid"] for k in status["retiring"]]  # kept for one token lifetime
        assert meshctl(["ca", "status", "--socket", str(p.socket)]) == 0
        shown = capsys.readouterr().out
        assert f"retiring: {first}" in shown and "root rotation: idle" in shown
    finally:
        p.stop()
