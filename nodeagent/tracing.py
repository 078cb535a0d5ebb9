"""The node agent's spans: one per HBONE tunnel, at the source agent and at the destination agent.

The agent moves bytes and sees no HTTP, so it cannot read an application's trace context.  What it has
is the HBONE CONNECT, which carries a `traceparent` (`mesh.hbone.headers`):

- outbound (the source agent): a tunnel it opens for a pod starts a new trace, sampled with the
  percentage of the Telemetry resources that apply to the source pod's namespace (else the agent's
  `--trace-sampling`), and its CONNECT carries the tunnel span's `traceparent`;
- inbound (the destination agent): a tunnel whose CONNECT carries a `traceparent` continues that trace,
  its span a child of the sender's (a waypoint sends the span of the request that opened the tunnel,
  another agent its tunnel span), and the sender's sampling decision is followed; without one, the
  agent samples a new trace itself, with the destination pod's namespace's percentage.

Telemetry (`TelemetryView`): the control plane sends node agents the `Telemetry` resources (as L7Config
envelopes of kind TELEMETRY, `controlplane.discovery.filter`); the discovery handler is their only writer.
A pod's namespace is resolved as the waypoint resolves its own (`mesh.tracing.sampler.resolve`: the root
namespace's, then the namespace's own, the first by name at each level; those with a selector or
targetRefs do not apply to an agent), and `disableSpanReporting` is followed too.  Custom tags are not:
the agent sees no requests to read headers from.

Plain TCP (passthrough, 15006) makes no span.  A span is named `outbound|inbound tunnel <authority>`,
lasts as long as the tunnel, and carries who talked to whom, the bytes and the response flag; a flag
other than "-" makes it an error.  Nothing here blocks: spans go to the exporter's queue.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.api.schema import drop_nulls
from mesh.errors import MeshError
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from mesh.tracing.context import NO_PARENT, Parent
from mesh.tracing.propagation import parse_traceparent
from mesh.tracing.sampler import TelemetryDoc, TracingPolicy, resolve
from mesh.tracing.span import AttributeValue, SpanKind
from mesh.tracing.tracer import DEFAULT_POLICY, Started, Tracer

log = logging.getLogger("nodeagent.tracing")

OUTBOUND = "outbound"
INBOUND = "inbound"


@dataclass(frozen=True)
class TunnelSpan:
    """A tunnel's span while the tunnel is up; `end` records it (once the outcome is known)."""

    tracer: Tracer
    started: Started
    direction: str
    authority: str
    attributes: tuple[tuple[str, AttributeValue], ...]

    @property
    def traceparent(self) -> str:
        return self.started.traceparent

    def end(self, *, flag: str, bytes_sent: int, bytes_received: int, error: str = "") -> None:
        failed = flag not in ("", "-")
        self.tracer.finish(
            self.started, f"{self.direction} tunnel {self.authority}",
            SpanKind.CLIENT if self.direction == OUTBOUND else SpanKind.SERVER,
            (*self.attributes, ("response_flags", flag or "-"), ("bytes_sent", bytes_sent),
             ("bytes_received", bytes_received), *((("error", True),) if failed else ())),
            error=failed, message=error or flag)


class TelemetryView:
    """The Telemetry resources the agent was sent, and each namespace's resolved policy (a read model:
    only the discovery handler calls `apply`; the data path calls `policy`, from any thread)."""

    def __init__(self) -> None:
        # The resources, and the policies resolved from them by namespace (filled as namespaces are asked
        # for): one reference, swapped whole, so a reader sees the old set or the new, never a mix.
        self._current: tuple[tuple[TelemetryDoc, ...], dict[str, TracingPolicy]] = ((), {})

    def apply(self, resources: Mapping[str, Message]) -> None:
        """Replace the whole set with the Telemetry envelopes among `resources` (the L7Config view)."""
        docs = []
        for name, msg in sorted(resources.items()):
            if not isinstance(msg, pb.L7Config):
                raise TypeError(f"{name}: expected an L7Config, got {type(msg).__name__}")
            if msg.kind == pb.TELEMETRY:  # the control plane sends agents no other kind; others are ignored
                docs.append(TelemetryDoc(msg.namespace, msg.name, drop_nulls(json_format.MessageToDict(msg.spec))))
        self._current = (tuple(docs), {})
        log.info('{"event": "telemetry", "resources": %s}', json.dumps([d.ref for d in docs]))

    def policy(self, namespace: str) -> TracingPolicy:
        """The tracing policy of the pods of `namespace`."""
        docs, policies = self._current
        found = policies.get(namespace)
        if found is None:
            found = policies[namespace] = resolve(docs, namespace=namespace)
        return found


@functools.lru_cache(maxsize=4096)
def _namespace(principal: str) -> str:
    """The namespace of a pod's identity ("" when it is not a workload identity)."""
    try:
        return SpiffeId.parse(principal).namespace
    except MeshError:
        return ""


class TunnelTracer:
    """Starts the tunnel spans of one agent, sampled as the Telemetry of the pod's namespace says (without a
    `telemetry` view, or when none applies: the tracer's default percentage)."""

    def __init__(self, tracer: Tracer, node: str = "", telemetry: TelemetryView | None = None) -> None:
        self.tracer = tracer
        self.node = node
        self.telemetry = telemetry

    def policy(self, pod_principal: str) -> TracingPolicy:
        """The policy of the pod whose tunnel it is (its identity names its namespace)."""
        if self.telemetry is None:
            return DEFAULT_POLICY
        namespace = _namespace(pod_principal)
        return self.telemetry.policy(namespace) if namespace else DEFAULT_POLICY

    def outbound(self, authority: str, *, source: str, source_principal: str, destination_principal: str,
                 service: str = "") -> TunnelSpan:
        return self._span(NO_PARENT, self.policy(source_principal), OUTBOUND, authority, source, source_principal,
                          destination_principal, service)

    def inbound(self, traceparent: str | None, authority: str, *, source: str, source_principal: str,
                destination_principal: str) -> TunnelSpan:
        ctx = parse_traceparent(traceparent)
        parent = Parent(ctx, ctx.sampled) if ctx is not None else NO_PARENT
        # A sender's decision is followed; without one, the destination pod's namespace's percentage.
        return self._span(parent, self.policy(destination_principal), INBOUND, authority, source, source_principal,
                          destination_principal, "")

    def _span(self, parent: Parent, policy: TracingPolicy, direction: str, authority: str, source: str,
              source_principal: str, destination_principal: str, service: str) -> TunnelSpan:
        attrs: list[tuple[str, AttributeValue]] = [
            ("component", "nodeagent"), ("hbone.direction", direction), ("hbone.authority", authority),
            ("peer.address", source), ("source.principal", source_principal or "unknown"),
            ("destination.principal", destination_principal or "unknown"), ("node", self.node)]
        if service:
            attrs.append(("destination.service", service))
        return TunnelSpan(self.tracer, self.tracer.start(parent, policy), direction, authority, tuple(attrs))
