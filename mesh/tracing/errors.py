"""The errors of `mesh.tracing`: one hierarchy, messages that say what to do."""

from __future__ import annotations

from mesh.errors import MeshError


class TracingError(MeshError):
    """Tracing cannot be set up as asked (a bad collector URL)."""


class OtlpError(TracingError):
    """A body that is not an OTLP trace export."""


class ExportError(TracingError):
    """A batch of spans could not be delivered to the collector."""
