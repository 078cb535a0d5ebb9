"""The admission webhook: AdmissionReview v1 answered with the strict validator, over HTTPS with a serving
certificate from the mesh's CA."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_objects import pod, virtual_service, waypoint

from ca.authority import CertificateAuthority
from controlplane.webhook import BadReview, WebhookServer, review
from mesh.api.errors import ValidationError
from mesh.api.validate import Document, validate_documents

pytestmark = pytest.mark.timeout(30)


def admission(obj: Any, *, operation: str = "CREATE", uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002") -> bytes:
    """An AdmissionReview as the API server sends it (admission.k8s.io/v1)."""
    meta = obj.get("metadata", {}) if isinstance(obj, dict) else {}
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "operation": operation, "name": meta.get("name"), "namespace": meta.get("namespace"),
            "kind": {"group": "networking.istio.io", "version": "v1", "kind": "VirtualService"},
            "resource": {"group": "networking.istio.io", "version": "v1", "resource": "virtualservices"},
            "userInfo": {"username": "admin", "groups": ["system:masters"]},
            "object": obj if operation != "DELETE" else None, "oldObject": obj if operation == "DELETE" else None,
            "dryRun": False,
        },
    }).encode()


def meshctl_lines(obj: Any, source: str = "bad.yaml") -> list[str]:
    """What `meshctl apply -f bad.yaml` says about the document: the validator's lines, located."""
    _, errors = validate_documents([Document(source, 1, obj)])
    return ValidationError(errors).lines()


def test_a_good_object_is_allowed_and_the_uid_echoed() -> None:
    answer = review(admission(virtual_service("reviews")))
    assert answer == {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                      "response": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}}


def test_a_bad_object_is_refused_with_what_meshctl_apply_says() -> None:
    bad = virtual_service("reviews", timeout="forever")
    bad["spec"]["http"][0]["route"][0]["weight"] = 150
    response = review(admission(bad, uid="u-1"))["response"]
    assert response["uid"] == "u-1" and response["allowed"] is False
    assert response["status"]["code"] == 400
    located = meshctl_lines(bad)
    assert len(located) == 2
    assert response["status"]["message"].split("; ") == [line.removeprefix("bad.yaml:document 1:") for line in located]


def test_what_is_not_the_meshs_to_refuse_is_allowed() -> None:
    assert review(admission(virtual_service("reviews", timeout="forever"), operation="DELETE"))["response"]["allowed"]
    assert review(admission(waypoint("ingress", gateway_class="istio") | {"spec": {"x": 1}}))["response"]["allowed"]
    assert not review(admission(waypoint() | {"spec": {"gatewayClassName": "istio-waypoint"}}))["response"]["allowed"]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the body is not JSON"),
    (b"[]", "not an AdmissionReview"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}).encode(),
     "'admission.k8s.io/v1beta1' is not served: use admission.k8s.io/v1"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), "has no request"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"object": {}}}).encode(),
     "request has no uid"),
])
def test_a_malformed_review_is_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadReview, match=message):
        review(body)


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[tuple[int, CertificateAuthority]]:
    authority = CertificateAuthority.load_or_create(tmp_path / "ca")
    server = WebhookServer(authority, ["localhost", "127.0.0.1"], "127.0.0.1:0")
    port = int(server.start()[0])
    yield port, authority
    server.stop()


def post(port: int, authority: CertificateAuthority, body: bytes, *, method: str = "POST",
         path: str = "/validate") -> tuple[int, Any]:
    context = ssl.create_default_context(cadata=authority.root_pem)  # checks the name, like the API server
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_over_https_with_a_certificate_from_the_mesh_ca(webhook: tuple[int, CertificateAuthority]) -> None:
    port, authority = webhook
    status, answer = post(port, authority, admission(virtual_service("reviews")))
    assert status == 200 and answer["response"]["allowed"] is True

    bad = pod("web-1") | {"spec": {"containers": []}}
    status, answer = post(port, authority, admission(bad))
    assert status == 200 and answer["response"]["allowed"] is False
    assert "spec.containers" in answer["response"]["status"]["message"]

    status, answer = post(port, authority, b"{not json")
    assert status == 400 and answer["error"].startswith("the body is not JSON")
    status, answer = post(port, authority, b"", method="GET")
    assert status == 405


def test_a_client_that_does_not_trust_the_mesh_root_cannot_talk_to_it(
        webhook: tuple[int, CertificateAuthority], tmp_path: Path) -> None:
    port, _ = webhook
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    with pytest.raises(ssl.SSLCertVerificationError):
        post(port, other, admission(virtual_service("reviews")))
    status, _ = post(port, webhook[1], admission(virtual_service("reviews")))  # the server is still there
    assert status == 200
