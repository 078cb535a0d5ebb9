"""Which workloads an L4 `Authorization` applies to: one rule for the enforcer and for the control plane.

The node agent asks it for the destination of each connection (`policies_for`); the control plane asks
it for the workloads of a node, to send that node's agent only the policies that can apply there.
Istio's rule: a policy in the root namespace without a selector applies to every workload (GLOBAL); one
in another namespace without a selector to every workload of that namespace (NAMESPACE); one with a
selector to the workloads whose labels include it, in its namespace, or in any namespace when it lives
in the root namespace (WORKLOAD_SELECTOR).
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh import defaults
from mesh.proto import discovery_pb2 as pb


def applies_to(policy: pb.Authorization, namespace: str, labels: Mapping[str, str],
               root_namespace: str = defaults.ROOT_NAMESPACE) -> bool:
    """True if `policy` applies to a workload of `namespace` carrying `labels`."""
    if policy.scope == pb.GLOBAL:
        return True
    if policy.scope == pb.NAMESPACE:
        return policy.namespace == namespace
    if policy.scope == pb.WORKLOAD_SELECTOR:
        in_scope = policy.namespace in (namespace, root_namespace)
        return in_scope and all(labels.get(k) == v for k, v in policy.selector.items())
    return False
