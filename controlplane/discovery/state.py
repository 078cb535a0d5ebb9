"""The delta xDS protocol for one client stream, without I/O.

`StreamState` takes the client's `DeltaDiscoveryRequest`s and the control plane's snapshots in, and
gives out what to do: `Push` (a response to send) and records (`Acked`, `Nacked`) for reporting.  The
gRPC layer (`controlplane.discovery.server`) only moves these values between the network and this object.

Per resource type the stream keeps:

- the subscription: wildcard (all resources the client may have, see `controlplane.discovery.filter`)
  and/or explicit names;
- `sent`: the version of each resource the client has or is about to have (optimistic: set when a
  response goes out, reverted when the client NACKs it);
- `acked`: versions the client confirmed (or declared with `initial_resource_versions` on resume);
- `rejected`: versions the client NACKed in a response of their own.  These are never sent again; the
  resource is sent again only once its content (hence its version) changes.

A NACK refuses a whole response, but the fault is usually one resource's.  So a NACKed response that
carried several changes is not held against any of them: it is sent again at once as two responses, each
with half of the changes, and so on for each half that is NACKed again, until the bad resource is alone
in a response; that one is remembered in `rejected`, and every good one is ACKed and applied.  A DENY
policy applied beside a broken one thus still reaches the client.  (Halves, not one response per
resource: a NACK never makes more than two responses, so a large response cannot flood the client.)

A response goes out when a type is first subscribed (always, even if empty, so a client knows it is in
sync), when the subscription changes, when a snapshot changes resources the client should have, and
when a NACK of several changes is split as above.  An ACK, or a NACK of one change, triggers none.

Who the client is (`node`) comes from its first request, passed through `identify` (the discovery server's
check against the caller's token, `controlplane.discovery.identity`).  Every resource, subscribed by
wildcard or by name, is taken from the client's `view` of the snapshot (what it may have, in the form it
gets it; computed once per snapshot).  Where what a client may have of one type depends on another
(`depends`), a change of the other compares the first in whole; the types in `leads` send their new and
changed resources before, and their removals after, the other types' changes.  What a client can make the
control plane remember is bounded (`Limits`): subscribed types, names per type, the length of a name.
Going over a limit is a `ProtocolError` with `code` RESOURCE_EXHAUSTED, which ends the stream.
"""

from __future__ import annotations

import enum
import itertools
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2 as xds
from google.protobuf import any_pb2

from controlplane.discovery.filter import DEPENDS, LEADS, ViewFn
from mesh.xds.node import NodeInfo

# type_url -> resource name -> (version, resource)
Resources = Mapping[str, Mapping[str, tuple[str, any_pb2.Any]]]
# type_url -> names whose version changed (added, changed or removed) since the previous snapshot
Changes = Mapping[str, Iterable[str]]

WILDCARD = "*"
MAX_PENDING = 256


@dataclass(frozen=True)
class Limits:
    """What one client may make the control plane hold.  Per stream: subscribed types, names per type
    (explicit subscriptions and resumed versions each), the length of a name, responses queued for a
    client that does not read them (`outbox`, the server's).  Per server: concurrent streams, in all and
    per authenticated identity (a node agent, or a waypoint's replicas, reconnecting)."""

    max_types: int = 8
    max_names: int = 4096
    max_name_length: int = 512
    outbox: int = 256
    max_streams: int = 4096
    max_streams_per_identity: int = 8


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Snapshot:
    """Everything the control plane serves at one moment; `version` names the moment."""

    version: str
    resources: Resources


@dataclass(frozen=True)
class Push:
    type_url: str
    nonce: str
    version: str
    updated: tuple[tuple[str, str, any_pb2.Any], ...]  # (name, version, resource)
    removed: tuple[str, ...]

    def to_response(self) -> xds.DeltaDiscoveryResponse:
        resp = xds.DeltaDiscoveryResponse(
            type_url=self.type_url,
            nonce=self.nonce,
            system_version_info=self.version,
            removed_resources=list(self.removed),
        )
        for name, version, res in self.updated:
            r = resp.resources.add(name=name, version=version)
            r.resource.CopyFrom(res)
        return resp


@dataclass(frozen=True)
class Acked:
    type_url: str
    nonce: str
    version: str


@dataclass(frozen=True)
class Nacked:
    type_url: str
    nonce: str
    version: str
    error: str
    names: tuple[str, ...]


Output = Push | Acked | Nacked


class ProtocolError(Exception):
    """The stream must be closed with this message and `code` (a gRPC status name): the client broke the
    protocol (INVALID_ARGUMENT), went over a limit (RESOURCE_EXHAUSTED) or claimed to be someone its
    token does not say it is (PERMISSION_DENIED)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


def exhausted(message: str) -> ProtocolError:
    return ProtocolError(message, "RESOURCE_EXHAUSTED")


class Phase(enum.Enum):
    AWAITING_FIRST_REQUEST = "awaiting-first-request"
    ACTIVE = "active"


@dataclass
class _Pending:
    type_url: str
    version: str
    updated: dict[str, str]
    removed: frozenset[str]


@dataclass
class TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    acked_version: str = ""
    last_nack: Nacked | None = None


class StreamState:
    """The protocol state of one DeltaAggregatedResources stream."""

    def __init__(self, view: ViewFn, nonce_prefix: str | None = None, *, limits: Limits = DEFAULT_LIMITS,
                 identify: Callable[[NodeInfo], NodeInfo] | None = None,
                 depends: Mapping[str, frozenset[str]] = DEPENDS, leads: Iterable[str] = LEADS) -> None:
        self._view_fn = view
        self._depends = depends
        self._leads = frozenset(leads)
        self._viewed: tuple[Resources, NodeInfo, Resources] | None = None  # (snapshot resources, node, view)
        self._limits = limits
        self._identify = identify
        self.phase = Phase.AWAITING_FIRST_REQUEST
        self.node: NodeInfo = NodeInfo(id="")
        self.types: dict[str, TypeState] = {}
        self.last_acked_version = ""
        self._pending: dict[str, _Pending] = {}
        self._prefix = nonce_prefix if nonce_prefix is not None else secrets.token_hex(4)
        self._counter = itertools.count(1)

    # -- inputs ------------------------------------------------------------------------------------

    def receive(self, req: xds.DeltaDiscoveryRequest, snapshot: Snapshot) -> list[Output]:
        """Handle one request from the client; returns records and pushes, in order."""
        if self.phase is Phase.AWAITING_FIRST_REQUEST:
            if not req.node.id:
                raise ProtocolError("the first request must carry node.id")
            claimed = NodeInfo.from_proto(req.node)
            self.node = self._identify(claimed) if self._identify is not None else claimed
            self.phase = Phase.ACTIVE
        if not req.type_url:
            raise ProtocolError("request without type_url")
        out: list[Output] = []
        ts = self.types.get(req.type_url)
        first = ts is None
        if ts is None:
            if len(self.types) >= self._limits.max_types:
                raise exhausted(f"too many resource types: a stream may subscribe to at most "
                                f"{self._limits.max_types}")
            ts = self.types[req.type_url] = TypeState()
        if req.response_nonce:
            records, retry = self._ack_or_nack(ts, req)
            out.extend(records)
            for names in retry:  # a NACK of several changes: again, in halves
                push = self._diff(req.type_url, ts, snapshot, names=names, always=False)
                if push is not None:
                    out.append(push)
        changed = self._update_subscription(ts, req, first)
        if first or changed:
            push = self._diff(req.type_url, ts, snapshot, names=None, always=first)
            if push is not None:
                out.append(push)
        return out

    def on_snapshot(self, snapshot: Snapshot, changes: Changes | None = None) -> list[Output]:
        """The control plane's resources changed; `changes` (if known) limits what is compared."""
        if not self.types:
            return []
        current = self._view(snapshot)
        first: list[Output] = []
        middle: list[Output] = []
        last: list[Output] = []
        for type_url, ts in self.types.items():
            names: Iterable[str] | None = None
            if changes is not None and not any(changes.get(d) for d in self._depends.get(type_url, ())):
                names = changes.get(type_url)
                if not names:
                    continue
            if type_url in self._leads:
                candidates = list(self._candidates(ts, current.get(type_url, {}), names))
                present = [n for n in candidates if n in current.get(type_url, {})]
                absent = [n for n in candidates if n not in current.get(type_url, {})]
                for bucket, group in ((first, present), (last, absent)):
                    push = self._diff(type_url, ts, snapshot, names=group, always=False) if group else None
                    if push is not None:
                        bucket.append(push)
                continue
            push = self._diff(type_url, ts, snapshot, names=names, always=False)
            if push is not None:
                middle.append(push)
        return [*first, *middle, *last]

    def _view(self, snapshot: Snapshot) -> Resources:
        """This client's view of `snapshot` (computed once per snapshot and client)."""
        viewed = self._viewed
        if viewed is None or viewed[0] is not snapshot.resources or viewed[1] != self.node:
            viewed = self._viewed = (snapshot.resources, self.node, self._view_fn(self.node, snapshot.resources))
        return viewed[2]

    # -- steps -------------------------------------------------------------------------------------

    def _ack_or_nack(self, ts: TypeState, req: xds.DeltaDiscoveryRequest) -> tuple[list[Output], list[list[str]]]:
        """The records, and the groups of names to send again (each group in a response of its own)."""
        pending = self._pending.pop(req.response_nonce, None)
        if pending is None or pending.type_url != req.type_url:
            return [], []  # stale or unknown nonce (e.g. from before a reconnect): nothing to learn
        if req.HasField("error_detail"):
            alone = len(pending.updated) + len(pending.removed) == 1
            for name, version in pending.updated.items():
                if alone:
                    ts.rejected[name] = version
                if ts.sent.get(name) == version:
                    if name in ts.acked:
                        ts.sent[name] = ts.acked[name]
                    else:
                        ts.sent.pop(name, None)
            for name in pending.removed:
                if name not in ts.sent and name in ts.acked:
                    ts.sent[name] = ts.acked[name]
            nack = Nacked(
                type_url=req.type_url,
                nonce=req.response_nonce,
                version=pending.version,
                error=req.error_detail.message or f"code {req.error_detail.code}",
                names=tuple(sorted(pending.updated)),
            )
            ts.last_nack = nack
            changes = sorted([*pending.updated, *pending.removed])
            half = (len(changes) + 1) // 2
            retry = [] if alone else [changes[:half], changes[half:]]
            return [nack], retry
        for name, version in pending.updated.items():
            ts.acked[name] = version
            ts.rejected.pop(name, None)
        for name in pending.removed:
            ts.acked.pop(name, None)
            ts.rejected.pop(name, None)
        ts.acked_version = pending.version
        self.last_acked_version = pending.version
        if not ts.rejected:
            ts.last_nack = None
        return [Acked(type_url=req.type_url, nonce=req.response_nonce, version=pending.version)], []

    def _check_names(self, req: xds.DeltaDiscoveryRequest, ts: TypeState) -> None:
        limits = self._limits
        names = [*req.resource_names_subscribe, *req.resource_names_unsubscribe, *req.initial_resource_versions]
        long = next((n for n in names if len(n) > limits.max_name_length), None)
        if long is not None:
            raise exhausted(f"resource name of {len(long)} characters: at most {limits.max_name_length} are accepted")
        if len(req.initial_resource_versions) > limits.max_names:
            raise exhausted(f"{len(req.initial_resource_versions)} resumed resource versions of {req.type_url}: "
                            f"at most {limits.max_names} are accepted")
        subscribed = ts.names | {n for n in req.resource_names_subscribe if n != WILDCARD}
        if len(subscribed) > limits.max_names:
            raise exhausted(f"{len(subscribed)} names subscribed to of {req.type_url}: at most {limits.max_names} "
                            "are accepted (subscribe with the wildcard instead)")

    def _update_subscription(self, ts: TypeState, req: xds.DeltaDiscoveryRequest, first: bool) -> bool:
        self._check_names(req, ts)
        before = (ts.wildcard, frozenset(ts.names))
        subscribe = list(req.resource_names_subscribe)
        if first:
            # An empty first subscription means "wildcard" (the original delta xDS convention).
            ts.wildcard = not subscribe or WILDCARD in subscribe
            for name, version in req.initial_resource_versions.items():
                ts.sent[name] = version
                ts.acked[name] = version
        elif WILDCARD in subscribe:
            ts.wildcard = True
        ts.names.update(n for n in subscribe if n != WILDCARD)
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD:
                ts.wildcard = False
            else:
                ts.names.discard(name)
        # What is no longer subscribed the client drops by itself; forget it so that subscribing again
        # sends it again.
        if not ts.wildcard:
            for name in [n for n in ts.sent if n not in ts.names]:
                ts.sent.pop(name, None)
                ts.acked.pop(name, None)
                ts.rejected.pop(name, None)
        return (ts.wildcard, frozenset(ts.names)) != before

    def _diff(
        self,
        type_url: str,
        ts: TypeState,
        snapshot: Snapshot,
        names: Iterable[str] | None,
        always: bool,
    ) -> Push | None:
        current = self._view(snapshot).get(type_url, {})
        updated: list[tuple[str, str, any_pb2.Any]] = []
        removed: list[str] = []
        for name in self._candidates(ts, current, names):
            entry = current.get(name)
            if entry is not None and (name in ts.names or ts.wildcard):
                version, res = entry
                if ts.sent.get(name) == version or ts.rejected.get(name) == version:
                    continue
                updated.append((name, version, res))
            else:
                if entry is None:
                    ts.rejected.pop(name, None)
                if name in ts.sent:
                    removed.append(name)
        if not updated and not removed and not always:
            return None
        nonce = f"{self._prefix}-{next(self._counter)}"
        for name, version, _ in updated:
            ts.sent[name] = version
        for name in removed:
            ts.sent.pop(name, None)
        if len(self._pending) >= MAX_PENDING:  # a client that never answers: forget the oldest
            del self._pending[next(iter(self._pending))]
        self._pending[nonce] = _Pending(
            type_url=type_url,
            version=snapshot.version,
            updated={n: v for n, v, _ in updated},
            removed=frozenset(removed),
        )
        return Push(
            type_url=type_url,
            nonce=nonce,
            version=snapshot.version,
            updated=tuple(sorted(updated, key=lambda u: u[0])),
            removed=tuple(sorted(removed)),
        )

    @staticmethod
    def _candidates(ts: TypeState, current: Mapping[str, object], names: Iterable[str] | None) -> Iterable[str]:
        """The names to compare: `names`, or all the client has or may get.  A resource outside the
        client's view is never sent, whether subscribed by wildcard or by name."""
        if names is not None:
            return names
        if ts.wildcard:
            return itertools.chain(current, (n for n in ts.sent if n not in current))
        return set(ts.names) | set(ts.sent)

    # -- reporting ---------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, object]]:
        """Per type: subscription, counts, last ACKed version, outstanding NACK (for proxy-status)."""
        out: dict[str, dict[str, object]] = {}
        for type_url, ts in sorted(self.types.items()):
            nack = ts.last_nack
            out[type_url] = {
                "wildcard": ts.wildcard,
                "names": sorted(ts.names),
                "resources": len(ts.acked),
                "acked_version": ts.acked_version,
                "pending": sum(1 for p in self._pending.values() if p.type_url == type_url),
                "nack": None
                if nack is None
                else {"version": nack.version, "nonce": nack.nonce, "error": nack.error, "names": list(nack.names)},
            }
        return out
