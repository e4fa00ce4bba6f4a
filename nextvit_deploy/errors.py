"""Exceptions of nextvit-deploy. A ``DeployError`` is a user-facing problem: one line that names the fix.

The CLI prints ``str(error)`` without a traceback and exits 2 (``NEXTVIT_DEBUG=1`` shows the traceback).
Parity failures are not exceptions: they are reports whose ``bool()`` is False.
"""
from __future__ import annotations

__all__ = ["DeployError", "BadInput", "MissingDependency", "CheckpointMismatch", "ArtifactError",
           "EngineNotBuilt"]


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


class EngineNotBuilt(MissingDependency):
    """``export --target trt`` wrote the TensorRT-ready ONNX (``.artifact``) but could not build the engine.

    Attributes:
        artifact: the written ONNX :class:`~nextvit_deploy.artifact.Artifact` (manifest saved).
        trtexec: the equivalent ``trtexec`` command that builds the engine on a machine with TensorRT.
    """

    def __init__(self, message: str, *, artifact: object = None, trtexec: str = "") -> None:
        super().__init__(message)
        self.artifact = artifact
        self.trtexec = trtexec
