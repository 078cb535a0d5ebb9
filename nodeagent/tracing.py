"""The node agent's spans: one per HBONE tunnel, at the source agent and at the destination agent.

The agent moves bytes and sees no HTTP, so it cannot read an application's trace context.  What it has
is the HBONE CONNECT, which carries a `traceparent` (`mesh.hbone.headers`):

- outbound (the source agent): a tunnel it opens for a pod starts a new trace, sampled with the agent's
  `--trace-sampling` percentage, and its CONNECT carries the tunnel span's `traceparent`;
- inbound (the destination agent): a tunnel whose CONNECT carries a `traceparent` continues that trace,
  its span a child of the sender's (a waypoint sends the span of the request that opened the tunnel,
  another agent its tunnel span), and the sender's sampling decision is followed; without one, the
  agent samples a new trace itself.

Plain TCP (passthrough, 15006) makes no span.  A span is named `outbound|inbound tunnel <authority>`,
lasts as long as the tunnel, and carries who talked to whom, the bytes and the response flag; a flag
other than "-" makes it an error.  Nothing here blocks: spans go to the exporter's queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.tracing.context import NO_PARENT, Parent
from mesh.tracing.propagation import parse_traceparent
from mesh.tracing.span import AttributeValue, SpanKind
from mesh.tracing.tracer import Started, Tracer

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


class TunnelTracer:
    """Starts the tunnel spans of one agent."""

    def __init__(self, tracer: Tracer, node: str = "") -> None:
        self.tracer = tracer
        self.node = node

    def outbound(self, authority: str, *, source: str, source_principal: str, destination_principal: str,
                 service: str = "") -> TunnelSpan:
        return self._span(NO_PARENT, OUTBOUND, authority, source, source_principal, destination_principal, service)

    def inbound(self, traceparent: str | None, authority: str, *, source: str, source_principal: str,
                destination_principal: str) -> TunnelSpan:
        ctx = parse_traceparent(traceparent)
        parent = Parent(ctx, ctx.sampled) if ctx is not None else NO_PARENT
        return self._span(parent, INBOUND, authority, source, source_principal, destination_principal, "")

    def _span(self, parent: Parent, direction: str, authority: str, source: str, source_principal: str,
              destination_principal: str, service: str) -> TunnelSpan:
        attrs: list[tuple[str, AttributeValue]] = [
            ("component", "nodeagent"), ("hbone.direction", direction), ("hbone.authority", authority),
            ("peer.address", source), ("source.principal", source_principal or "unknown"),
            ("destination.principal", destination_principal or "unknown"), ("node", self.node)]
        if service:
            attrs.append(("destination.service", service))
        return TunnelSpan(self.tracer, self.tracer.start(parent), direction, authority, tuple(attrs))
