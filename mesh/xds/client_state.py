"""The client side of delta xDS, without I/O: responses in, requests (ACK/NACK) and updates out.

`ClientState` holds the last good configuration (per type: name -> (version, message)) and survives
reconnects: `initial_requests()` for a new stream carries `initial_resource_versions`, so the server
sends only what changed while the client was away.

Each response becomes a `Candidate` (decide): the resources it would produce, or the reason it cannot
be used.  The caller lets its handler look at the candidate's `Update`, then calls `commit()` (apply,
ACK) or `reject()` (keep the old configuration, NACK with the reason).  Either returns the request to
send back.  A response is taken whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2 as xds
from google.protobuf.message import Message

from mesh.xds import resources as rs
from mesh.xds.node import NodeInfo

INVALID_ARGUMENT = 3  # google.rpc.Code

TypeView = dict[str, tuple[str, Message]]


@dataclass(frozen=True)
class Update:
    """One accepted (or proposed) change of one resource type."""

    type_url: str
    version: str  # the control plane's snapshot version
    nonce: str
    updated: Mapping[str, Message]
    removed: tuple[str, ...]
    resources: Mapping[str, Message]  # the whole view of this type after the change


@dataclass(frozen=True)
class Candidate:
    update: Update
    view: TypeView
    error: str = ""  # set when the response itself is unusable (bad type, undecodable resource)


@dataclass
class ClientState:
    node: NodeInfo
    # type_url -> explicit names, or None for a wildcard subscription
    subscriptions: Mapping[str, Sequence[str] | None]
    views: dict[str, TypeView] = field(default_factory=dict)
    acked_version: dict[str, str] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)
    nacks: int = 0

    def initial_requests(self) -> list[xds.DeltaDiscoveryRequest]:
        """The requests that open a stream (a new one or after a reconnect): one per type."""
        self.synced.clear()
        out = []
        for i, (type_url, names) in enumerate(self.subscriptions.items()):
            req = xds.DeltaDiscoveryRequest(type_url=type_url)
            if i == 0:
                req.node.CopyFrom(self.node.to_proto())
            req.resource_names_subscribe.extend(["*"] if names is None else list(names))
            for name, (version, _) in self.views.get(type_url, {}).items():
                req.initial_resource_versions[name] = version
            out.append(req)
        return out

    def on_response(self, resp: xds.DeltaDiscoveryResponse) -> Candidate:
        old = self.views.get(resp.type_url, {})
        view: TypeView = dict(old)
        updated: dict[str, Message] = {}
        error = ""
        if resp.type_url not in self.subscriptions:
            error = f"not subscribed to {resp.type_url}"
        cls = rs.MESSAGE_CLASSES.get(resp.type_url)
        if cls is None and not error:
            error = f"unknown resource type {resp.type_url}"
        for res in resp.resources if not error else ():
            assert cls is not None
            msg = cls()
            if res.resource.type_url != resp.type_url or not res.resource.Unpack(msg):
                error = f"resource {res.name!r} is not a {resp.type_url}"
                break
            updated[res.name] = msg
            view[res.name] = (res.version, msg)
        for name in resp.removed_resources:
            view.pop(name, None)
        update = Update(
            type_url=resp.type_url,
            version=resp.system_version_info,
            nonce=resp.nonce,
            updated=updated,
            removed=tuple(resp.removed_resources),
            resources={n: m for n, (_, m) in view.items()},
        )
        return Candidate(update=update, view=view, error=error)

    def commit(self, cand: Candidate) -> xds.DeltaDiscoveryRequest:
        u = cand.update
        self.views[u.type_url] = cand.view
        self.acked_version[u.type_url] = u.version
        self.synced.add(u.type_url)
        return xds.DeltaDiscoveryRequest(type_url=u.type_url, response_nonce=u.nonce)

    def reject(self, cand: Candidate, reason: str) -> xds.DeltaDiscoveryRequest:
        u = cand.update
        self.nacks += 1
        self.synced.add(u.type_url)  # the server answered; what we run is still the last good config
        req = xds.DeltaDiscoveryRequest(type_url=u.type_url, response_nonce=u.nonce)
        req.error_detail.code = INVALID_ARGUMENT
        req.error_detail.message = reason or "rejected"
        return req

    def resources(self, type_url: str) -> dict[str, Message]:
        return {n: m for n, (_, m) in self.views.get(type_url, {}).items()}
