"""The node agent's errors."""

from __future__ import annotations

from mesh.errors import MeshError


class NodeAgentError(MeshError):
    pass


class RedirectError(NodeAgentError):
    """Installing or removing a pod's redirect rules failed."""
