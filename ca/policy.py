"""The CA's authorization decision, without I/O: which identity may this caller have signed?

- A workload may have only its own identity, and may not impersonate anyone.
- A node agent must name the pod identity it asks for in `ImpersonatedIdentity`, and gets it only when a
  pod with that namespace and service account is scheduled on the agent's node.
- Either way the CSR must ask for exactly the identity that is allowed, in the CA's trust domain.
"""

from __future__ import annotations

from ca.auth import Caller, NodeAgent, Workload
from ca.errors import PermissionDeniedError, SANError
from ca.pods import PodLocator
from mesh.identity import SpiffeId


def allowed_identity(
    caller: Caller,
    impersonated: SpiffeId | None,
    requested: SpiffeId,
    pods: PodLocator,
    trust_domain: str,
) -> SpiffeId:
    """The identity to sign, or `PermissionDeniedError` / `SANError` saying why not."""
    if isinstance(caller, Workload):
        if impersonated is not None:
            raise PermissionDeniedError(
                f"{caller} may not use ImpersonatedIdentity: only node agents ask on behalf of pods"
            )
        allowed = caller.identity
    elif isinstance(caller, NodeAgent):
        if impersonated is None:
            raise PermissionDeniedError(
                f"{caller} must name the pod identity it asks for in the ImpersonatedIdentity metadata"
            )
        if impersonated.trust_domain != trust_domain:
            raise PermissionDeniedError(
                f"{impersonated} is outside this CA's trust domain {trust_domain!r}"
            )
        if not pods.pod_on_node(caller.node, impersonated.namespace, impersonated.service_account):
            raise PermissionDeniedError(
                f"{caller} may not impersonate {impersonated}: no pod in namespace "
                f"{impersonated.namespace!r} with service account {impersonated.service_account!r} "
                f"is scheduled on node {caller.node!r}"
            )
        allowed = impersonated
    else:  # pragma: no cover - exhaustive over Caller
        raise PermissionDeniedError(f"unknown caller {caller!r}")
    if allowed.trust_domain != trust_domain:
        raise PermissionDeniedError(f"{allowed} is outside this CA's trust domain {trust_domain!r}")
    if requested != allowed:
        raise SANError(f"CSR asks for {requested}, but {caller} may only have {allowed}")
    return allowed
