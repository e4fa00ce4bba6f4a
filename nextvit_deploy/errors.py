"""Exceptions of nextvit-deploy. A ``DeployError`` is a user-facing problem: one line that names the fix.

The CLI prints ``str(error)`` without a traceback and exits 2 (``NEXTVIT_DEBUG=1`` shows the traceback).
Parity failures are not exceptions: they are reports whose ``bool()`` is False.
"""
from __future__ import annotations

__all__ = ["DeployError", "BadInput", "MissingDependency", "CheckpointMismatch", "ArtifactError"]


class DeployError(Exception):
    """Base class for errors the user can fix; the message says how."""


class BadInput(DeployError):
    """An argument, file or image the user supplied cannot be used."""


class CheckpointMismatch(BadInput):
    """A checkpoint is missing, corrupt, unsafe, or of another variant or layout."""


class ArtifactError(BadInput):
    """An artifact is missing its manifest, or the manifest does not describe it."""


class MissingDependency(DeployError):
    """An optional package (tensorrt, coremltools, timm, ...) is needed but not installed."""
