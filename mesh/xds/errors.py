"""Errors of the discovery client."""

from __future__ import annotations

from mesh.errors import MeshError


class XdsError(MeshError):
    """A discovery client problem."""


class Rejected(XdsError):
    """Raised by an update handler to refuse an update; the message becomes the NACK's error_detail."""
