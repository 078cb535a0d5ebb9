"""Translation of AuthorizationPolicies and PeerAuthentications into the L4 `Authorization` messages that
node agents enforce.

What each policy means at L4 is `mesh.policy.projection` (shared with waypoints, which project their own
policies for non-HTTP tunnels); this module only walks the snapshot and keys the results by resource name.
Policies with `targetRef(s)` are left to waypoints (see translate.l7); CUSTOM ones are sent as DENY
(fail closed) and reported in `problems`.
"""

from __future__ import annotations

from typing import Any

from controlplane.translate.guard import guarded
from mesh.policy.projection import authorization_policy, peer_authentication
from mesh.proto import discovery_pb2 as pb


def build_authorizations(snapshot: Any, problems: list[str], errors: list[str] | None = None) -> dict[str, pb.Authorization]:
    """The L4 policies; a policy that cannot be translated is left out and reported in `errors`."""
    errors = errors if errors is not None else problems
    out: dict[str, pb.Authorization] = {}
    for body in snapshot.of_kind("AuthorizationPolicy"):
        msg = guarded(body, errors, authorization_policy, body, problems)
        if msg is not None:
            out[f"{msg.namespace}/{msg.name}"] = msg
    for body in snapshot.of_kind("PeerAuthentication"):
        msg = guarded(body, errors, peer_authentication, body)
        if msg is not None:
            out[f"{msg.namespace}/{msg.name}"] = msg
    return out
