"""The control plane's production assembly with `--config-source kubernetes`, against the stand-in API
server: the cluster's objects served over discovery to a caller authenticated by TokenReview, the CA
signing for a node agent's pods, the admission webhook, and the command line."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds
from fake_apiserver import FakeApiServer, Token
from kube_objects import namespace, pod, service, virtual_service

from controlplane.app import ControlPlaneThread, Running
from controlplane.main import build_parser
from controlplane.options import KUBERNETES, Options
from mesh.proto import ca_pb2, ca_pb2_grpc
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo
from tests.unit.ca.ca_helpers import SLEEP, csr_pem

pytestmark = pytest.mark.timeout(60)
AGENT = ("istio-system", "ambient-nodeagent")


@pytest.fixture
def cluster() -> Iterator[FakeApiServer]:
    with FakeApiServer() as api:
        api.put(namespace("default", **{"istio.io/dataplane-mode": "ambient"}))
        api.put(pod("sleep-1", node="node-a", ip="10.244.1.5", sa="sleep", labels={"app": "sleep"}))
        api.put(service("sleep", vip="10.96.0.10"))
        agent = api.put(pod("ambient-nodeagent-x1", "istio-system", node="node-a", ip="172.18.0.2", sa=AGENT[1]))
        api.tokens["agent-a"] = Token(*AGENT, pod_name="ambient-nodeagent-x1", pod_uid=agent["metadata"]["uid"])
        yield api


@pytest.fixture
def control_plane(cluster: FakeApiServer, tmp_path: Path) -> Iterator[tuple[Running, Options]]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(cluster.kubeconfig())
    opts = Options(state_dir=tmp_path / "state", grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                   serving_hosts=["127.0.0.1", "localhost"], config_source=KUBERNETES, kubeconfig=kubeconfig,
                   webhook_listen="127.0.0.1:0", sync_timeout=10)
    cp = ControlPlaneThread(opts)
    running = cp.start()
    try:
        yield running, opts
    finally:
        cp.stop()


def channel(running: Running) -> grpc.Channel:
    assert running.root_pem is not None
    return grpc.secure_channel(f"127.0.0.1:{running.grpc_port}", grpc.ssl_channel_credentials(running.root_pem))


def test_the_clusters_objects_reach_an_authenticated_node_agent(cluster: FakeApiServer,
                                                                control_plane: tuple[Running, Options]) -> None:
    running, _ = control_plane
    cfg = ClientConfig(target=f"127.0.0.1:{running.grpc_port}",
                       node=NodeInfo(id="nodeagent~node-a~node-a.", role="nodeagent", node="node-a"),
                       subscriptions={rs.WORKLOAD: None}, root_pem=running.root_pem, backoff_initial=0.05,
                       metadata=(("authorization", "Bearer agent-a"),))
    with XdsClient(cfg) as client:
        assert client.wait_for(lambda c: "default/sleep-1" in c.resources(rs.WORKLOAD), 10)
        cluster.put(pod("sleep-2", node="node-b", ip="10.244.2.7", sa="sleep", labels={"app": "sleep"}))
        assert client.wait_for(lambda c: "default/sleep-2" in c.resources(rs.WORKLOAD), 10)
    assert any(r.path.endswith("/tokenreviews") for r in cluster.requests)


@pytest.mark.parametrize("token, code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                         ("forged", grpc.StatusCode.UNAUTHENTICATED),
                                         ("agent-a", grpc.StatusCode.UNAVAILABLE)])
def test_discovery_refuses_callers_it_cannot_authenticate(cluster: FakeApiServer,
                                                          control_plane: tuple[Running, Options],
                                                          token: str | None, code: grpc.StatusCode) -> None:
    running, _ = control_plane
    if code == grpc.StatusCode.UNAVAILABLE:
        cluster.fail("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 500)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with channel(running) as ch:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        request = xds.DeltaDiscoveryRequest(type_url=rs.WORKLOAD)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stub.DeltaAggregatedResources(iter([request]), metadata=metadata, timeout=10)))
    assert refused.value.code() == code
    assert (refused.value.details() or "").startswith("discovery: ")


def test_the_ca_signs_for_the_pods_on_the_agents_node(control_plane: tuple[Running, Options]) -> None:
    running, _ = control_plane
    with channel(running) as ch:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem(uri=SLEEP), validity_duration=3600)
        request.metadata.update({"ImpersonatedIdentity": SLEEP})
        response = stub.CreateCertificate(request, metadata=[("authorization", "Bearer agent-a")], timeout=10)
    assert len(response.cert_chain) >= 2


def test_the_webhook_and_what_is_not_served(control_plane: tuple[Running, Options]) -> None:
    running, opts = control_plane
    port = running.extras["webhook_port"]
    endpoints = json.loads((opts.home / "endpoints.json").read_text())
    assert endpoints["webhook"] == f"127.0.0.1:{port}"
    assert not (opts.home / "api.sock").exists()  # on Kubernetes, kubectl writes the configuration
    assert running.root_pem is not None
    context = ssl.create_default_context(cadata=running.root_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    review: dict[str, Any] = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                              "request": {"uid": "u-7", "operation": "CREATE", "namespace": "default",
                                          "object": virtual_service("reviews", timeout="never")}}
    try:
        conn.request("POST", "/validate", body=json.dumps(review))
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert answer["response"]["uid"] == "u-7" and answer["response"]["allowed"] is False


def test_the_command_line(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--state-dir", str(tmp_path), "--config-source", "kubernetes",
                                      "--kubeconfig", "/etc/kube.conf", "--webhook-listen", "0.0.0.0:15017",
                                      "--node-agent-account", "kube-system/ztunnel"])
    assert (args.config_source, args.kubeconfig, args.node_agent_account) == \
        ("kubernetes", Path("/etc/kube.conf"), ["kube-system/ztunnel"])
    assert build_parser().parse_args(["--state-dir", str(tmp_path)]).config_source == "local"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--state-dir", str(tmp_path), "--node-agent-account", "ztunnel"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--state-dir", str(tmp_path), "--config-source", "etcd"])
