"""The dashboard's errors: one hierarchy; each says what failed and what to do."""

from __future__ import annotations

from mesh.errors import MeshError


class DashboardError(MeshError):
    """The dashboard cannot start as asked (a port in use, a bad option)."""


class SourceError(DashboardError):
    """A data source did not answer.  `source` names it (prometheus, traces, controlplane, agent ...):
    the page shows the message as a banner for that source, never an error page."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(message)
        self.source = source


class PrometheusUnavailable(SourceError):
    def __init__(self, message: str) -> None:
        super().__init__("prometheus", message)
