"""Who is calling, on Kubernetes: projected service-account tokens checked with a TokenReview.

    authenticator = TokenReviewAuthenticator(api_client, trust_domain="cluster.local",
                                             node_agents=["istio-system/ambient-nodeagent"])
    caller = authenticator.authenticate({"authorization": "Bearer <token>"})   # NodeAgent | Workload

The same `Authenticator` as `ca.auth.JwtAuthenticator` (the local cluster's), so the CA and discovery do
not know which one they have.  For each request:

1. `POST /apis/authentication.k8s.io/v1/tokenreviews` with the token and the audience `istio-ca`.  The
   API server says whether it is authenticated, for which of the audiences asked (`status.audiences`),
   and as whom (`status.user.username` = `system:serviceaccount:<ns>:<sa>`).  A token for another
   audience, or an answer without our audience in it, is refused.
2. A service account listed in `node_agents` ("NS/SA", Istio's CA_TRUSTED_NODE_ACCOUNTS) is a node
   agent.  Its node is its pod's `spec.nodeName`: the pod is named by the token itself (a projected
   token is bound to its pod, and the review's `status.user.extra` carries
   `authentication.kubernetes.io/pod-name` and `pod-uid`) and read from the API, and the uid must match
   (a later pod with the same name is another pod).  The CA's node check (`ca.policy`) then uses that node.
3. Any other service account is a workload: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.

Fail closed: a token the API server rejects is UNAUTHENTICATED (`AuthenticationError`, with the API
server's reason); a review or pod lookup that fails, errors or times out is UNAVAILABLE
(`AuthenticationUnavailableError`, saying what failed).  Nothing is cached: every request is reviewed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import urllib3
from kubernetes.client import ApiClient, AuthenticationV1Api, CoreV1Api, V1TokenReview, V1TokenReviewSpec
from kubernetes.client.exceptions import ApiException

from ca.auth import DEFAULT_AUDIENCE, Caller, NodeAgent, Workload, bearer_token
from ca.errors import AuthenticationError, AuthenticationUnavailableError
from mesh import defaults
from mesh.identity import IdentityError, SpiffeId

# The node agent DaemonSet's service account (daemonset/nodeagent.yaml).
DEFAULT_NODE_AGENT_ACCOUNTS = ("istio-system/ambient-nodeagent",)
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
DEFAULT_TIMEOUT = 5.0  # seconds, for each call to the API server


def parse_account(text: str) -> tuple[str, str]:
    """`"istio-system/ambient-nodeagent"` -> ("istio-system", "ambient-nodeagent"); ValueError otherwise."""
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"{text!r} is not a service account: write NAMESPACE/NAME")
    return namespace, name


def service_account_of(username: str) -> tuple[str, str]:
    """(namespace, name) of `system:serviceaccount:<ns>:<sa>`; `AuthenticationError` for any other user."""
    rest = username.removeprefix(SERVICE_ACCOUNT_PREFIX)
    namespace, _, name = rest.partition(":")
    if rest == username or not namespace or not name or ":" in name:
        raise AuthenticationError(
            f"token belongs to {username!r}, not a service account: send a projected service-account token"
        )
    return namespace, name


class TokenReviewAuthenticator:
    """Authenticates callers by their Kubernetes service-account tokens (see the module docstring)."""

    def __init__(
        self,
        api: ApiClient,
        *,
        trust_domain: str = defaults.TRUST_DOMAIN,
        node_agents: Iterable[str] = DEFAULT_NODE_AGENT_ACCOUNTS,
        audience: str = DEFAULT_AUDIENCE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._reviews = AuthenticationV1Api(api)
        self._core = CoreV1Api(api)
        self.trust_domain = trust_domain
        self.node_agents = frozenset(parse_account(a) for a in node_agents)
        self.audience = audience
        self.timeout = timeout

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        username, extra = self._review(bearer_token(metadata))
        namespace, name = service_account_of(username)
        if (namespace, name) in self.node_agents:
            return NodeAgent(self._node_of(namespace, name, extra))
        try:
            return Workload(SpiffeId(self.trust_domain, namespace, name))
        except IdentityError as exc:
            raise AuthenticationError(f"service account {namespace}/{name}: {exc}") from None

    # ---- the TokenReview -----------------------------------------------------------------------------

    def _review(self, token: str) -> tuple[str, Mapping[str, list[str]]]:
        """(username, extra) of an authenticated token for our audience; raises otherwise."""
        body = V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                             spec=V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            review = self._reviews.create_token_review(body, _request_timeout=self.timeout)
        except Exception as exc:
            raise self._unavailable("token review", exc) from None
        status = review.status
        if status is None:
            raise AuthenticationUnavailableError("token review failed: the API server's answer has no status")
        if status.error:
            raise AuthenticationError(f"token rejected by the Kubernetes API server: {status.error}")
        if not status.authenticated or status.user is None or not status.user.username:
            raise AuthenticationError("token rejected by the Kubernetes API server: not authenticated")
        if self.audience not in (status.audiences or []):
            raise AuthenticationError(
                f"token is not for audience {self.audience!r} (the review confirmed "
                f"{', '.join(status.audiences or []) or 'no audience'}): mount a projected service-account "
                f"token with audience {self.audience!r}"
            )
        return status.user.username, dict(status.user.extra or {})

    def _node_of(self, namespace: str, name: str, extra: Mapping[str, list[str]]) -> str:
        """The node of the node agent's pod, which the token is bound to."""
        pod_name = _first(extra.get(POD_NAME_EXTRA))
        pod_uid = _first(extra.get(POD_UID_EXTRA))
        if not pod_name:
            raise AuthenticationError(
                f"node agent token ({namespace}/{name}) is not bound to a pod (no {POD_NAME_EXTRA} in the "
                "TokenReview): mount a projected service-account token, not a long-lived secret"
            )
        try:
            pod = self._core.read_namespaced_pod(pod_name, namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                raise AuthenticationError(f"node agent pod {namespace}/{pod_name} no longer exists") from None
            raise self._unavailable(f"reading node agent pod {namespace}/{pod_name}", exc) from None
        except Exception as exc:
            raise self._unavailable(f"reading node agent pod {namespace}/{pod_name}", exc) from None
        uid = pod.metadata.uid if pod.metadata is not None else None
        if pod_uid and uid != pod_uid:
            raise AuthenticationError(
                f"node agent token belongs to an earlier pod named {namespace}/{pod_name} (uid {pod_uid})"
            )
        node = pod.spec.node_name if pod.spec is not None else None
        if not node:
            raise AuthenticationError(f"node agent pod {namespace}/{pod_name} is not scheduled on a node")
        return str(node)

    @staticmethod
    def _unavailable(what: str, exc: BaseException) -> AuthenticationUnavailableError:
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
            exc = exc.reason  # what went wrong on the last try
        if isinstance(exc, ApiException):
            detail = f"the Kubernetes API server answered {exc.status} {exc.reason or ''}".rstrip()
            if exc.status in (401, 403):
                detail += " (may the control plane's service account create tokenreviews and get pods?)"
        elif isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
                exc, urllib3.exceptions.NewConnectionError):  # urllib3 makes a refused connection a timeout too
            detail = "the Kubernetes API server did not answer in time"
        elif isinstance(exc, urllib3.exceptions.HTTPError | OSError):
            detail = f"cannot reach the Kubernetes API server ({_reason(exc)})"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return AuthenticationUnavailableError(f"{what} failed: {detail}; refusing the request")


def _first(values: Any) -> str:
    if isinstance(values, list | tuple) and values:
        return str(values[0])
    return ""


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)
