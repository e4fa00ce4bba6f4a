"""The write step every exporter shares: one place owns temp file -> hash -> rename -> manifest.

An exporter opens :func:`export_stage` on its final path, writes the artifact to ``stage.path`` (a temp
file or folder beside the final one) and calls ``stage.publish(details)``: that hashes the bytes that
were written, builds the manifest record from the request (:func:`artifact_record`), and moves the
artifact and then its manifest into place. Nothing else in ``export/`` hashes, renames or writes a
manifest; anything not published is removed when the block exits.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifact import Artifact, Kind, Stage, publishing, sha256_path, tool_versions
from ..manifest import output_names_for, preprocessing_for
from . import ExportRequest, check_overwrite

__all__ = ["ExportStage", "export_stage", "artifact_record"]


def artifact_record(req: ExportRequest, path: Path, *, details: dict[str, Any], target: str | None = None,
                    extra_versions: tuple[str, ...] = ()) -> Artifact:
    """The manifest record of ``req``'s artifact whose final bytes are at ``path`` (hashed here)."""
    h, w = req.image_size
    return Artifact(
        path=path, target=target or req.target, precision=req.precision, variant=req.variant,
        input_shape=(req.batch[1], 3, h, w), batch=req.batch, dynamic_batch=req.dynamic_batch,
        features_only=req.features_only, input_name="input", output_names=output_names_for(req.features_only),
        preprocessing=preprocessing_for(req.variant, input_kind=req.input_kind), sha256=sha256_path(path),
        checkpoint=str(Path(req.checkpoint).resolve()) if req.checkpoint else None,
        checkpoint_sha256=req.checkpoint_sha256, checkpoint_hub=req.checkpoint_hub,
        seed=None if req.checkpoint else req.seed, depths=req.depths, opset=req.opset,
        num_classes=req.num_classes or 1000,
        versions=tool_versions("onnxsim", "onnxslim", *extra_versions), details=details)


@dataclass
class ExportStage:
    """What :func:`export_stage` yields: write to :attr:`path`, then :meth:`publish`."""

    req: ExportRequest
    stage: Stage

    @property
    def path(self) -> Path:
        """The temp path to write the artifact to (it becomes the final path on publish)."""
        return self.stage.path

    def publish(self, details: dict[str, Any], *, target: str | None = None, extra_versions: tuple[str, ...] = (),
                **overrides: Any) -> Artifact:
        """Hash what was written, then move it and its manifest into place. Returns the final artifact.

        ``overrides`` replace fields of the record (e.g. ``opset=None`` for a Core ML package).
        """
        art = artifact_record(self.req, self.stage.path, details=details, target=target,
                              extra_versions=extra_versions)
        return self.stage.publish(art.replace(**overrides) if overrides else art)


@contextlib.contextmanager
def export_stage(req: ExportRequest, final: Path, *, kind: Kind = "file") -> Iterator[ExportStage]:
    """Hold ``final``'s lock for one export of ``req`` and yield the stage to write it through.

    The overwrite check runs again once the lock is held, so two concurrent exports of different
    weights cannot both pass it.
    """
    with publishing(final, kind=kind) as stage:
        check_overwrite(req)
        yield ExportStage(req=req, stage=stage)
