"""The discovery resource types: type URLs, resource names, packing and versions.

Every resource travels packed in a `google.protobuf.Any`.  Producers (the control plane's translation)
build messages from `mesh.proto.discovery_pb2` and use `name_of` / `pack` / `version_of` here, so that
names and versions are computed the same way everywhere.
"""

from __future__ import annotations

import hashlib

from google.protobuf import any_pb2
from google.protobuf.message import Message

from mesh.proto import discovery_pb2 as pb

TYPE_PREFIX = "type.googleapis.com/"
PACKAGE = "ambientmesh.discovery.v1"

WORKLOAD = f"{TYPE_PREFIX}{PACKAGE}.Workload"
SERVICE = f"{TYPE_PREFIX}{PACKAGE}.Service"
AUTHORIZATION = f"{TYPE_PREFIX}{PACKAGE}.Authorization"
L7_CONFIG = f"{TYPE_PREFIX}{PACKAGE}.L7Config"

ALL_TYPES: tuple[str, ...] = (WORKLOAD, SERVICE, AUTHORIZATION, L7_CONFIG)

MESSAGE_CLASSES: dict[str, type[Message]] = {
    WORKLOAD: pb.Workload,
    SERVICE: pb.Service,
    AUTHORIZATION: pb.Authorization,
    L7_CONFIG: pb.L7Config,
}

L7_KIND_NAMES = {
    pb.VIRTUAL_SERVICE: "VirtualService",
    pb.DESTINATION_RULE: "DestinationRule",
    pb.AUTHORIZATION_POLICY: "AuthorizationPolicy",
    pb.REQUEST_AUTHENTICATION: "RequestAuthentication",
    pb.TELEMETRY: "Telemetry",
}


def name_of(msg: Message) -> str:
    """The xDS resource name of a discovery message (see mesh/proto/discovery.proto)."""
    if isinstance(msg, pb.Workload):
        return msg.uid
    if isinstance(msg, pb.Service):
        return f"{msg.namespace}/{msg.hostname}"
    if isinstance(msg, pb.Authorization):
        return f"{msg.namespace}/{msg.name}"
    if isinstance(msg, pb.L7Config):
        kind = L7_KIND_NAMES.get(msg.kind, "Unknown")
        return f"{kind}/{msg.namespace}/{msg.name}"
    raise TypeError(f"not a discovery resource: {type(msg).__name__}")


def pack(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg, deterministic=True)
    return out


def version_of(resource: any_pb2.Any) -> str:
    """A content version: equal content gives an equal version (deterministic serialization)."""
    data = resource.type_url.encode() + b"\0" + resource.value
    return hashlib.sha256(data).hexdigest()[:16]
