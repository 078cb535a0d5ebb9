"""TokenReview authentication (Kubernetes), with the real `kubernetes` client against the stand-in API
server: who the caller is, the node of a node agent from its pod, and every failure refused (fail closed)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from ca_helpers import SLEEP, csr_pem
from kubernetes.client import ApiClient, Configuration

from ca.auth import NodeAgent, Workload
from ca.authority import CertificateAuthority
from ca.errors import AuthenticationError, AuthenticationUnavailableError, CAError
from ca.pods import InMemoryPodLocator
from ca.server import start_ca_server
from ca.tokenreview import TokenReviewAuthenticator, parse_account, service_account_of
from mesh.identity import SpiffeId
from mesh.proto import ca_pb2, ca_pb2_grpc
from tests.unit.controlplane.fake_apiserver import FakeApiServer, Token

pytestmark = pytest.mark.timeout(30)
AGENT_SA = ("istio-system", "ambient-nodeagent")


def client_of(api: FakeApiServer) -> ApiClient:
    cfg = Configuration(host=api.url)
    cfg.api_key = {"authorization": "Bearer control-plane-token"}
    cfg.retries = False
    return ApiClient(cfg)


def agent_pod(name: str, node: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": AGENT_SA[0], "labels": {"app": "ambient-nodeagent"}},
            "spec": {"nodeName": node, "serviceAccountName": AGENT_SA[1], "containers": [{"name": "agent"}]},
            "status": {"phase": "Running", "podIP": "172.18.0.2"}}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.tokens["sleep-token"] = Token("default", "sleep")
        pod = server.put(agent_pod("ambient-nodeagent-abcde", "node-a"))
        server.tokens["agent-a"] = Token(*AGENT_SA, pod_name="ambient-nodeagent-abcde", pod_uid=pod["metadata"]["uid"])
        yield server


@pytest.fixture
def auth(api: FakeApiServer) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(client_of(api), node_agents=["/".join(AGENT_SA)], timeout=0.5)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def refusal(auth: TokenReviewAuthenticator, token: str) -> CAError:
    with pytest.raises(CAError) as info:
        auth.authenticate(bearer(token))
    return info.value


def test_a_workload_is_its_service_account(api: FakeApiServer, auth: TokenReviewAuthenticator) -> None:
    assert auth.authenticate(bearer("sleep-token")) == Workload(SpiffeId("cluster.local", "default", "sleep"))
    [review] = [r for r in api.requests if r.path.endswith("/tokenreviews")]
    assert review.body["kind"] == "TokenReview" and review.body["apiVersion"] == "authentication.k8s.io/v1"
    assert review.body["spec"] == {"token": "sleep-token", "audiences": ["istio-ca"]}
    assert review.headers["authorization"] == "Bearer control-plane-token"


def test_a_node_agent_is_on_the_node_its_pod_is_scheduled_on(api: FakeApiServer,
                                                             auth: TokenReviewAuthenticator) -> None:
    assert auth.authenticate(bearer("agent-a")) == NodeAgent("node-a")
    assert any(r.path == "/api/v1/namespaces/istio-system/pods/ambient-nodeagent-abcde" for r in api.requests)


@pytest.mark.parametrize("setup, token, message", [
    (None, "forged", "token rejected by the Kubernetes API server: [invalid bearer token"),
    ("other-audience", "kube-token", "is invalid for the target audiences"),
    ("audience-blind", "sleep-token", "token is not for audience 'istio-ca'"),
    ("unbound", "agent-secret", "is not bound to a pod"),
    ("pod-gone", "agent-a", "no longer exists"),
    ("pod-replaced", "agent-a", "belongs to an earlier pod"),
])
def test_tokens_the_api_server_does_not_vouch_for_are_unauthenticated(
        api: FakeApiServer, auth: TokenReviewAuthenticator, setup: str | None, token: str, message: str) -> None:
    if setup == "other-audience":
        api.tokens["kube-token"] = Token("default", "sleep", audiences=("https://kubernetes.default.svc",))
    elif setup == "audience-blind":  # an API server whose authenticator ignores audiences
        api.review_ignores_audiences = True
    elif setup == "unbound":  # a long-lived secret token: no pod in the review
        api.tokens["agent-secret"] = Token(*AGENT_SA)
    elif setup == "pod-gone":
        api.delete("Pod", "istio-system", "ambient-nodeagent-abcde")
    elif setup == "pod-replaced":
        api.delete("Pod", "istio-system", "ambient-nodeagent-abcde")
        api.put(agent_pod("ambient-nodeagent-abcde", "node-b"))  # same name, another pod (uid)
    error = refusal(auth, token)
    assert isinstance(error, AuthenticationError) and error.code == grpc.StatusCode.UNAUTHENTICATED
    assert message in str(error)


@pytest.mark.parametrize("setup, message", [
    ("review-500", "token review failed: the Kubernetes API server answered 500"),
    ("review-403", "may the control plane's service account create tokenreviews"),
    ("review-slow", "token review failed: the Kubernetes API server did not answer in time"),
    ("pod-500", "reading node agent pod istio-system/ambient-nodeagent-abcde failed"),
    ("down", "token review failed: cannot reach the Kubernetes API server"),
])
def test_a_review_that_cannot_be_made_refuses_the_caller(api: FakeApiServer, auth: TokenReviewAuthenticator,
                                                        setup: str, message: str) -> None:
    if setup == "review-500":
        api.fail("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 500)
    elif setup == "review-403":
        api.fail("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 403)
    elif setup == "review-slow":
        api.review_delay = 1.5  # the authenticator waits 0.5 s
    elif setup == "pod-500":
        api.fail("GET", "/api/v1/namespaces/istio-system/pods/ambient-nodeagent-abcde", 500)
    elif setup == "down":
        api.stop()
    error = refusal(auth, "agent-a")
    assert isinstance(error, AuthenticationUnavailableError) and error.code == grpc.StatusCode.UNAVAILABLE
    assert message in str(error) and "refusing the request" in str(error)


def test_without_a_bearer_token_nothing_is_asked(api: FakeApiServer, auth: TokenReviewAuthenticator) -> None:
    with pytest.raises(AuthenticationError, match="no credentials"):
        auth.authenticate({})
    assert not [r for r in api.requests if r.path.endswith("/tokenreviews")]


def test_names() -> None:
    assert service_account_of("system:serviceaccount:default:sleep") == ("default", "sleep")
    with pytest.raises(AuthenticationError, match="not a service account"):
        service_account_of("system:node:node-a")
    assert parse_account("istio-system/ztunnel") == ("istio-system", "ztunnel")
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        parse_account("ztunnel")


def test_the_ca_signs_for_pods_on_the_agents_node_only(api: FakeApiServer, auth: TokenReviewAuthenticator,
                                                       authority: CertificateAuthority,
                                                       pods: InMemoryPodLocator) -> None:
    """Over gRPC: the node from the TokenReview's pod is the node the impersonation check uses."""
    api.put(agent_pod("ambient-nodeagent-fghij", "node-b"))
    api.tokens["agent-b"] = Token(*AGENT_SA, pod_name="ambient-nodeagent-fghij",
                                  pod_uid=api.get("Pod", "istio-system", "ambient-nodeagent-fghij")["metadata"]["uid"])
    server = start_ca_server(authority, auth, pods)  # pods: sleep on node-a, web on node-b
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=server.root_pem.encode())
        with grpc.secure_channel(server.address, creds) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)

            def ask(token: str) -> ca_pb2.IstioCertificateResponse:
                req = ca_pb2.IstioCertificateRequest(csr=csr_pem(uri=SLEEP), validity_duration=3600)
                req.metadata.update({"ImpersonatedIdentity": SLEEP})
                return stub.CreateCertificate(req, metadata=[("authorization", f"Bearer {token}")], timeout=10)

            assert len(ask("agent-a").cert_chain) >= 2  # sleep runs on node-a
            with pytest.raises(grpc.RpcError) as denied:
                ask("agent-b")
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "is scheduled on node 'node-b'" in (denied.value.details() or "")
            api.fail("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 503)
            with pytest.raises(grpc.RpcError) as unavailable:
                ask("agent-a")
            assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "token review failed" in (unavailable.value.details() or "")
            with pytest.raises(grpc.RpcError) as forged:
                ask("forged")
            assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)
