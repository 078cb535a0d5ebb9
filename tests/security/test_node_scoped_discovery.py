"""Each node agent gets only what its node needs (the discovery filter, `controlplane.discovery.filter`).

Against a real control plane (store, translation, TLS gRPC, node tokens), configured with YAML:

- the agent of node-1 gets the policies that apply to its pods (mesh-wide, its namespaces', those whose
  selector matches one of its pods) and not a policy selecting a pod of node-2, nor a namespace-wide
  policy of a namespace with no pod on node-1, even when it names them;
- it gets its own pods in full, and node-2's pods without their labels but with everything routing and
  telemetry use (addresses, node, identity, waypoint, service membership, canonical names);
- routing from node-1 to node-2's pods (by service VIP and by pod address) still decides HBONE to the
  right address with the right identity, with the agent's own routing code on what it received;
- a pod arriving on node-1 brings the policy that selects it before the pod itself, and a label change
  that takes a policy away removes it only after the pod's new labels arrive.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds

from controlplane.app import ControlPlaneThread, Running
from controlplane.config.store import Store
from controlplane.options import Options
from mesh.api.loader import parse_text
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.node import NodeInfo
from nodeagent.proxy.routing import RouteKind, decide
from nodeagent.state import AUTHORIZATION, SERVICE, WORKLOAD, MeshState

pytestmark = pytest.mark.timeout(60)

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: vault, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db, version: v3, tier: secret-tier}}
spec: {nodeName: node-2, serviceAccountName: db, containers: [{name: c}]}
status: {podIP: 10.244.2.7}
---
apiVersion: v1
kind: Pod
metadata: {name: keeper, namespace: vault, labels: {app: keeper}}
spec: {nodeName: node-2, serviceAccountName: keeper, containers: [{name: c}]}
status: {podIP: 10.244.2.8}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.50, selector: {app: db}, ports: [{port: 5432, targetPort: 5432}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-only-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-deny-vault, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {namespaces: [vault]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: vault-lockdown, namespace: vault}
spec: {action: ALLOW, rules: [{from: [{source: {namespaces: [vault]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-wide, namespace: shop}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["9999"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["6666"]}}]}]}
"""


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Running]:
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    store(running).apply(parse_text(MESH, "mesh.yaml"))
    yield running
    cp.stop()


def store(running: Running) -> Store:
    found: Store = running.extras["store"]
    return found


class Agent:
    """A raw discovery stream with a node agent's token: subscribes, ACKs everything, keeps what it got
    in a `MeshState` (the agent's own read model) and the order in which responses came."""

    def __init__(self, running: Running, node: str) -> None:
        token = running.extras["token_issuer"].mint_node_token(node)
        self.channel = grpc.secure_channel(f"127.0.0.1:{running.grpc_port}",
                                           grpc.ssl_channel_credentials(running.root_pem))
        self.requests: queue.Queue[xds.DeltaDiscoveryRequest | None] = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.call = stub.DeltaAggregatedResources(iter(self.requests.get, None),
                                                  metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        self.node = NodeInfo(id=f"nodeagent~{node}~{node}.", role="nodeagent", node=node)
        self.state = MeshState()
        self.log: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []  # (kind, updated, removed)

    def subscribe(self, *type_urls: str, names: tuple[str, ...] = ("*",)) -> None:
        for type_url in type_urls:
            req = xds.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=list(names))
            req.node.CopyFrom(self.node.to_proto())
            self.requests.put(req)
        for _ in type_urls:
            self.receive()

    def receive(self) -> xds.DeltaDiscoveryResponse:
        resp: xds.DeltaDiscoveryResponse = next(self.call)
        kind = {rs.WORKLOAD: WORKLOAD, rs.SERVICE: SERVICE, rs.AUTHORIZATION: AUTHORIZATION}[resp.type_url]
        cls: Any = rs.MESSAGE_CLASSES[resp.type_url]
        upserts = {}
        for r in resp.resources:
            msg = cls()
            r.resource.Unpack(msg)
            upserts[r.name] = msg
        self.state.apply(kind, upserts, resp.removed_resources)
        self.log.append((kind, tuple(sorted(upserts)), tuple(sorted(resp.removed_resources))))
        self.requests.put(xds.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce))
        return resp

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def node1(plane: Running) -> Iterator[Agent]:
    agent = Agent(plane, "node-1")
    agent.subscribe(rs.WORKLOAD, rs.SERVICE, rs.AUTHORIZATION)
    yield agent
    agent.close()


def policy_names(agent: Agent) -> list[str]:
    return sorted(f"{p.namespace}/{p.name}" for p in agent.state.policies())


def test_a_node_agent_gets_only_the_policies_of_its_pods(node1: Agent, plane: Running) -> None:
    assert policy_names(node1) == ["istio-system/mesh-wide", "shop/shop-wide", "shop/web-deny-vault"]
    node2 = Agent(plane, "node-2")
    try:
        node2.subscribe(rs.AUTHORIZATION)
        assert policy_names(node2) == ["istio-system/mesh-wide", "shop/db-only-web", "shop/shop-wide",
                                       "vault/vault-lockdown"]
    finally:
        node2.close()


def test_naming_another_nodes_policy_does_not_get_it(plane: Running) -> None:
    agent = Agent(plane, "node-1")
    try:
        agent.subscribe(rs.AUTHORIZATION, names=("shop/db-only-web", "vault/vault-lockdown", "shop/web-deny-vault"))
        assert policy_names(agent) == ["shop/web-deny-vault"]
    finally:
        agent.close()


def test_other_nodes_workloads_come_without_their_labels(node1: Agent) -> None:
    web = node1.state.workload("shop/web")
    assert web is not None and dict(web.labels) == {"app": "web", "version": "v1"}  # its own: in full
    db = node1.state.workload("shop/db")
    assert db is not None and not db.labels
    assert list(db.addresses) == ["10.244.2.7"] and db.node == "node-2" and db.tunnel_protocol == pb.HBONE
    assert (db.namespace, db.service_account) == ("shop", "db")
    assert list(db.services) == ["shop/db.shop.svc.cluster.local"]
    assert (db.canonical_name, db.canonical_revision) == ("db", "v3")  # telemetry labels unchanged


def test_routing_to_another_node_still_works(node1: Agent) -> None:
    web = node1.state.workload("shop/web")
    for dst in ("10.96.0.50", "10.244.2.7"):  # the service's VIP, the pod's own address
        route = decide(node1.state, web, dst, 5432, pod_ip="10.244.1.5")
        assert route.kind is RouteKind.HBONE, route
        assert route.next_hop == ("10.244.2.7", 15008)
        assert [e.uri for e in route.expected] == ["spiffe://cluster.local/ns/shop/sa/db"]


def test_policies_arrive_before_the_pod_they_protect_and_leave_after(node1: Agent, plane: Running) -> None:
    node1.log.clear()
    store(plane).apply(parse_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db-2, namespace: shop, labels: {app: db}}\n"
        "spec: {nodeName: node-1, serviceAccountName: db, containers: [{name: c}]}\nstatus: {podIP: 10.244.1.9}\n",
        "db2.yaml"))
    while not any("shop/db-2" in updated for kind, updated, _ in node1.log if kind == WORKLOAD):
        node1.receive()
    policy_at = next(i for i, (kind, updated, _) in enumerate(node1.log) if "shop/db-only-web" in updated)
    pod_at = next(i for i, (kind, updated, _) in enumerate(node1.log) if "shop/db-2" in updated)
    assert policy_at < pod_at, node1.log
    assert "shop/db-only-web" in policy_names(node1)

    node1.log.clear()  # relabel the new pod: the db policy no longer applies on node-1
    store(plane).apply(parse_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db-2, namespace: shop, labels: {app: cache}}\n"
        "spec: {nodeName: node-1, serviceAccountName: db, containers: [{name: c}]}\nstatus: {podIP: 10.244.1.9}\n",
        "db2.yaml"))
    while not any("shop/db-only-web" in removed for _, _, removed in node1.log):
        node1.receive()
    pod_at = next(i for i, (kind, updated, _) in enumerate(node1.log) if "shop/db-2" in updated)
    policy_at = next(i for i, (_, _, removed) in enumerate(node1.log) if "shop/db-only-web" in removed)
    assert pod_at < policy_at, node1.log
    relabelled = node1.state.workload("shop/db-2")
    assert relabelled is not None and relabelled.labels["app"] == "cache"
