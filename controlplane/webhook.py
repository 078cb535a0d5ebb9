"""The admission webhook: Kubernetes asks, before it stores an Istio object, whether the mesh accepts it.

    POST https://<control plane>:15017/validate      AdmissionReview (admission.k8s.io/v1)

    webhook = WebhookServer(authority, ["istiod.istio-system.svc"], "0.0.0.0:15017")
    port = webhook.start()     # serving in a thread of its own (`mesh.serve`, HTTPS)
    webhook.stop()

The answer (`review()`, pure) is an AdmissionReview with `response.uid` echoing the request's and
`allowed` from the same strict validator as `meshctl apply` (`mesh.api.validate.check_document`): when
it refuses, `response.status.message` carries its findings, each as `meshctl apply` prints it (the
field's path and what is wrong; there is no file or document number here).  A DELETE (or CONNECT) is
always allowed, and so is a Gateway of another class than the mesh's waypoints.  Only the one object
is checked: checks across objects (a VirtualService's subsets) cannot be, since `kubectl apply` sends a
file's objects one at a time in any order; the Kubernetes source leaves them out too.

A body that is not an AdmissionReview v1 with a request and a uid is answered 400 with what is wrong.

HTTPS with a serving certificate from the mesh's CA, like the one on 15012 (`ca.serving`): it names the
hosts the control plane is reached by (`--serving-host`, e.g. `istiod.istio-system.svc`) and is renewed
at half-life.  The ValidatingWebhookConfiguration's `caBundle` is the mesh's root certificate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from ca.authority import CertificateAuthority
from ca.serving import https_context
from controlplane.config.kubeobjects import refusal_message
from mesh.api.kinds import DEFAULT_NAMESPACE
from mesh.api.kinds_gateway import is_waypoint
from mesh.api.validate import check_document
from mesh.process import split_hostport
from mesh.serve.routes import Request, Response, Router, json_error
from mesh.serve.thread import ServerThread

log = logging.getLogger(__name__)

PATH = "/validate"
API_VERSION = "admission.k8s.io/v1"
MAX_BODY = 8 * 1024 * 1024  # an object (at most ~1.5 MB in etcd) and its old version, as JSON


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer."""


def review(body: bytes) -> dict[str, Any]:
    """The AdmissionReview answering the one in `body`; `BadReview` if it is malformed."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadReview(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "AdmissionReview":
        raise BadReview("the body is not an AdmissionReview")
    if data.get("apiVersion") != API_VERSION:
        raise BadReview(f"AdmissionReview apiVersion {data.get('apiVersion')!r} is not served: use {API_VERSION}")
    request = data.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview's request has no uid")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    problem = _problem(request)
    if problem is not None:
        response.update(allowed=False, status={"code": int(HTTPStatus.BAD_REQUEST), "reason": "BadRequest",
                                               "message": problem})
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _problem(request: dict[str, Any]) -> str | None:
    """What the validator finds wrong with the request's object, or None."""
    if request.get("operation") in ("DELETE", "CONNECT"):
        return None
    obj = request.get("object")
    if isinstance(obj, dict) and obj.get("kind") == "Gateway" and not is_waypoint(obj):
        return None  # another implementation's Gateway
    namespace = request.get("namespace") or DEFAULT_NAMESPACE
    _, errors = check_document(obj, str(namespace))
    return refusal_message(errors) if errors else None


def _handle(request: Request) -> Response:
    try:
        answer = review(request.body)
    except BadReview as exc:
        log.info("webhook: bad request: %s", exc)
        return json_error(str(exc), HTTPStatus.BAD_REQUEST)
    verdict = answer["response"]
    if not verdict["allowed"]:
        log.info("webhook: refused %s: %s", verdict["uid"], verdict["status"]["message"])
    return Response.json(answer)


def router() -> Router:
    return Router(error=json_error).add(PATH, _handle, methods=("POST",))


class WebhookServer(ServerThread):
    """The webhook on HTTPS `listen` ("HOST:PORT"; port 0 picks one), with a certificate for `hosts`."""

    def __init__(self, authority: CertificateAuthority, hosts: Sequence[str], listen: str) -> None:
        super().__init__("webhook")
        context, self.certificate = https_context(authority, hosts)  # certificate: the rotating one
        host, port = split_hostport(listen)
        self.tcp(router(), host, port, name="admission webhook", max_body=MAX_BODY, tls=context)
