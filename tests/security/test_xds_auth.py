"""Item 10: the discovery stream (15012) is authenticated, and who a client is comes from its token.

- A stream without a token, or with one this control plane did not sign, is refused (UNAUTHENTICATED)
  before anything is read or served.
- Role, node and waypoint come from the token: a node token opens a node agent's stream for its node;
  a workload token opens a waypoint's stream only for a waypoint with that identity.  A `node` that
  contradicts the token is refused; what the client leaves out is filled in from the token.
- A node agent never gets L7 configuration, a waypoint only its own, and naming resources explicitly
  does not get around that.
- `proxy-status` (the connection table) shows the authenticated identity, never a claimed one.
- Per-stream state is bounded (subscribed types, names per type, queued responses: RESOURCE_EXHAUSTED),
  and so are concurrent streams, server-wide and per identity.
"""

from __future__ import annotations

import asyncio
import datetime
import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds

from ca.auth import NodeTokenIssuer
from controlplane.app import ControlPlaneThread, Running
from controlplane.discovery.server import DiscoveryServer
from controlplane.discovery.source import MemorySource
from controlplane.discovery.state import Limits, ProtocolError, Snapshot, StreamState
from controlplane.options import Options
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo

pytestmark = pytest.mark.timeout(60)

WAYPOINT_ID = SpiffeId("cluster.local", "bookinfo", "waypoint")
PRODUCTPAGE_ID = SpiffeId("cluster.local", "bookinfo", "productpage")


def resources() -> list[Any]:
    return [
        pb.Workload(uid="bookinfo/productpage", name="productpage", namespace="bookinfo", addresses=["10.244.1.5"],
                    node="n1", service_account="productpage"),
        pb.Workload(uid="bookinfo/waypoint", name="waypoint", namespace="bookinfo", addresses=["10.244.2.9"],
                    node="n2", service_account="waypoint", is_waypoint=True,
                    labels={GATEWAY_NAME_LABEL: "waypoint"}),
        pb.L7Config(kind=pb.VIRTUAL_SERVICE, name="reviews", namespace="bookinfo", waypoints=["bookinfo/waypoint"]),
        pb.L7Config(kind=pb.AUTHORIZATION_POLICY, name="secret", namespace="other", waypoints=["other/wp2"]),
    ]


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Running]:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"),
                            MemorySource(resources()))
    running = cp.start()
    yield running
    cp.stop()


def issuer(running: Running) -> NodeTokenIssuer:
    found: NodeTokenIssuer = running.extras["token_issuer"]
    return found


class Stream:
    """One raw discovery stream: requests are sent as they are put, responses read one by one."""

    def __init__(self, running: Running, token: str | None) -> None:
        self.channel = grpc.secure_channel(f"127.0.0.1:{running.grpc_port}",
                                           grpc.ssl_channel_credentials(running.root_pem))
        self.requests: queue.Queue[xds.DeltaDiscoveryRequest | None] = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)  # type: ignore[no-untyped-call]
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        self.call = stub.DeltaAggregatedResources(self._requests(), metadata=metadata, timeout=20)

    def _requests(self) -> Iterator[xds.DeltaDiscoveryRequest]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def send(self, type_url: str, node: NodeInfo | None = None, names: tuple[str, ...] = ("*",),
             nonce: str = "") -> None:
        req = xds.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
        req.resource_names_subscribe.extend(names)
        if node is not None:
            req.node.CopyFrom(node.to_proto())
        self.requests.put(req)

    def receive(self) -> xds.DeltaDiscoveryResponse:
        resp: xds.DeltaDiscoveryResponse = next(self.call)
        return resp

    def refusal(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            while True:
                self.receive()
        return info.value

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def names(resp: xds.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in resp.resources)


def node_agent(node: str, **kw: str) -> NodeInfo:
    return NodeInfo(id=kw.pop("id", f"nodeagent~{node}~{node}."), role="nodeagent", node=node, **kw)


def waypoint(namespace: str, name: str, node: str = "n2") -> NodeInfo:
    return NodeInfo(id="", role="waypoint", node=node, namespace=namespace, name=name)


def test_a_stream_without_a_token_is_unauthenticated(plane: Running) -> None:
    s = Stream(plane, None)
    try:
        s.send(rs.WORKLOAD, node_agent("n1"))
        err = s.refusal()
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (err.details() or "")
    finally:
        s.close()
    assert plane.discovery.connections()["clients"] == []


def test_a_token_of_another_issuer_is_unauthenticated(plane: Running) -> None:
    forged = NodeTokenIssuer.generate().mint_node_token("n1")
    s = Stream(plane, forged)
    try:
        s.send(rs.WORKLOAD, node_agent("n1"))
        err = s.refusal()
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not signed by this control plane" in (err.details() or "")
    finally:
        s.close()


def test_role_and_node_are_taken_from_the_token(plane: Running) -> None:
    s = Stream(plane, issuer(plane).mint_node_token("n1"))
    try:
        s.send(rs.WORKLOAD, NodeInfo(id="anything"))  # claims nothing: the token says who it is
        assert names(s.receive()) == ["bookinfo/productpage", "bookinfo/waypoint"]
        [client] = plane.discovery.connections()["clients"]
        assert (client["role"], client["node"], client["identity"]) == ("nodeagent", "n1", "node agent of n1")
        assert client["node_id"] == "nodeagent~n1~n1."
    finally:
        s.close()


@pytest.mark.parametrize("claim", [
    node_agent("n2"),                                            # another node
    NodeInfo(id="nodeagent~n2~n2.", role="nodeagent"),           # another node, in the id only
    waypoint("other", "wp2"),                                    # the waypoint role
    NodeInfo(id="tool~n1~x.y", role="tool", node="n1"),          # a role that gets everything
])
def test_a_node_token_cannot_claim_anything_else(plane: Running, claim: NodeInfo) -> None:
    s = Stream(plane, issuer(plane).mint_node_token("n1"))
    try:
        s.send(rs.L7_CONFIG, claim)
        err = s.refusal()
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert "node agent of n1" in (err.details() or "")
    finally:
        s.close()


def test_a_workload_that_is_not_a_waypoint_is_refused(plane: Running) -> None:
    s = Stream(plane, issuer(plane).mint_workload_token(PRODUCTPAGE_ID))
    try:
        s.send(rs.WORKLOAD, waypoint("bookinfo", "productpage"))
        err = s.refusal()
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not a waypoint" in (err.details() or "")
    finally:
        s.close()


def test_a_waypoint_gets_only_its_own_l7_config(plane: Running) -> None:
    token = issuer(plane).mint_workload_token(WAYPOINT_ID)
    s = Stream(plane, token)
    try:
        s.send(rs.L7_CONFIG, waypoint("bookinfo", "waypoint"))
        assert names(s.receive()) == ["VirtualService/bookinfo/reviews"]
        [client] = plane.discovery.connections()["clients"]
        assert client["identity"] == f"workload {WAYPOINT_ID.uri}"
        assert (client["role"], client["namespace"], client["name"], client["node"]) == \
            ("waypoint", "bookinfo", "waypoint", "n2")
    finally:
        s.close()
    s = Stream(plane, token)
    try:
        s.send(rs.L7_CONFIG, waypoint("other", "wp2"))  # another waypoint's configuration
        err = s.refusal()
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        s.close()


def test_naming_resources_does_not_get_around_the_role(plane: Running) -> None:
    s = Stream(plane, issuer(plane).mint_node_token("n1"))
    try:
        s.send(rs.L7_CONFIG, node_agent("n1"), names=("VirtualService/bookinfo/reviews", "AuthorizationPolicy/other/secret"))
        assert names(s.receive()) == []
    finally:
        s.close()
    s = Stream(plane, issuer(plane).mint_workload_token(WAYPOINT_ID))
    try:
        s.send(rs.L7_CONFIG, waypoint("bookinfo", "waypoint"), names=("AuthorizationPolicy/other/secret",))
        assert names(s.receive()) == []
    finally:
        s.close()


def test_too_many_names_end_the_stream(plane: Running) -> None:
    s = Stream(plane, issuer(plane).mint_node_token("n1"))
    try:
        s.send(rs.WORKLOAD, node_agent("n1"), names=tuple(f"ns/w{i}" for i in range(Limits().max_names + 1)))
        err = s.refusal()
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "names" in (err.details() or "")
    finally:
        s.close()


# ---- the bounds, without sockets ----------------------------------------------------------------------

def _request(type_url: str, node: str = "n1", **kw: Any) -> xds.DeltaDiscoveryRequest:
    req = xds.DeltaDiscoveryRequest(type_url=type_url, **kw)
    req.node.CopyFrom(node_agent(node).to_proto())
    return req


def test_per_stream_state_is_bounded() -> None:
    limits = Limits(max_types=2, max_names=3, max_name_length=20)
    empty = Snapshot("1", {})
    s = StreamState(lambda _node, resources: resources, limits=limits)
    s.receive(_request("t1"), empty)
    s.receive(_request("t2"), empty)
    with pytest.raises(ProtocolError) as info:
        s.receive(_request("t3"), empty)
    assert info.value.code == "RESOURCE_EXHAUSTED" and "types" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        s.receive(_request("t1", resource_names_subscribe=["a", "b", "c", "d"]), empty)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ProtocolError) as info:
        StreamState(lambda _node, resources: resources, limits=limits).receive(
            _request("t1", initial_resource_versions={f"n{i}": "v" for i in range(4)}), empty)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ProtocolError) as info:
        StreamState(lambda _node, resources: resources, limits=limits).receive(_request("t1", resource_names_subscribe=["x" * 21]), empty)
    assert info.value.code == "RESOURCE_EXHAUSTED"


class Aborted(Exception):
    pass


class FakeContext:
    """What the servicer uses of a grpc.aio context; `write` blocks until `flowing` is set (a client
    that does not read)."""

    def __init__(self, token: str | None, flowing: bool = True) -> None:
        self.token = token
        self.written: list[xds.DeltaDiscoveryResponse] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.flowing = asyncio.Event()
        if flowing:
            self.flowing.set()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def peer(self) -> str:
        return "ipv4:10.244.1.9:40000"

    async def write(self, resp: xds.DeltaDiscoveryResponse) -> None:
        await self.flowing.wait()
        self.written.append(resp)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


async def _requests(reqs: asyncio.Queue[xds.DeltaDiscoveryRequest]) -> AsyncIterator[xds.DeltaDiscoveryRequest]:
    while True:
        yield await reqs.get()


async def _serve(server: DiscoveryServer, ctx: FakeContext, node: str = "n1") -> asyncio.Task[None]:
    reqs: asyncio.Queue[xds.DeltaDiscoveryRequest] = asyncio.Queue()
    reqs.put_nowait(_request(rs.WORKLOAD, node))
    task = asyncio.create_task(server.DeltaAggregatedResources(_requests(reqs), ctx))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    return task


def test_a_client_that_does_not_read_is_cut_off_when_its_outbox_is_full() -> None:
    tokens = NodeTokenIssuer.generate()

    async def main() -> None:
        source = MemorySource(resources())
        server = DiscoveryServer(source, authenticator=tokens.authenticator(), limits=Limits(outbox=4))
        await server.start()
        ctx = FakeContext(tokens.mint_node_token("n1"), flowing=False)
        task = await _serve(server, ctx)
        for i in range(10):
            source.put(pb.Workload(uid=f"x/{i}", name=str(i), namespace="x"))
            await asyncio.sleep(0.01)
        with pytest.raises(Aborted):
            await asyncio.wait_for(task, 5)
        assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "not reading" in ctx.aborted[1]
        assert server.connections()["clients"] == []
        await server.stop()

    asyncio.run(main())


def test_concurrent_streams_are_capped_per_identity_and_server_wide() -> None:
    tokens = NodeTokenIssuer.generate()

    async def main() -> None:
        server = DiscoveryServer(MemorySource(resources()), authenticator=tokens.authenticator(),
                                 limits=Limits(max_streams=3, max_streams_per_identity=2))
        await server.start()
        n1 = [FakeContext(tokens.mint_node_token("n1")) for _ in range(3)]
        tasks = [await _serve(server, ctx) for ctx in n1]
        assert tasks[2].done() and n1[2].aborted is not None
        assert n1[2].aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "node agent of n1" in n1[2].aborted[1]
        others = [FakeContext(tokens.mint_node_token(f"n{i}")) for i in (2, 3)]
        more = [await _serve(server, ctx, node) for ctx, node in zip(others, ("n2", "n3"), strict=True)]
        assert not more[0].done() and more[1].done()
        assert others[1].aborted is not None and others[1].aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(server.connections()["clients"]) == 3
        await server.stop()
        for t in tasks[:2] + more[:1]:
            await asyncio.wait_for(t, 5)

    asyncio.run(main())


def test_the_client_reads_its_token_again_for_each_stream(plane: Running, tmp_path: Path) -> None:
    """A token that expires (a projected service-account token, every hour) is replaced in its file; the
    next stream must carry the new one, or the client could never reconnect."""
    token_file = tmp_path / "token"
    token_file.write_text(issuer(plane).mint_node_token("n1", ttl=datetime.timedelta(seconds=-5)))  # expired
    cfg = ClientConfig(target=f"127.0.0.1:{plane.grpc_port}", node=node_agent("n1"), subscriptions={rs.WORKLOAD: None},
                       root_pem=plane.root_pem, backoff_initial=0.05, backoff_max=0.2,
                       metadata_fn=lambda: (("authorization", f"Bearer {token_file.read_text()}"),))
    with XdsClient(cfg) as client:
        assert client.wait_for(lambda c: "expired" in c.last_error, 10), client.last_error
        token_file.write_text(issuer(plane).mint_node_token("n1"))  # the kubelet (or the controller) renews it
        assert client.wait_synced(10)
