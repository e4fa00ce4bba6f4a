"""Artifacts: an exported file (or package directory) plus ``<name>.manifest.json`` describing it.

A file without a manifest is not an artifact. Writes are atomic and never destroy what they did not
create (the file-level pieces live in :mod:`nextvit_deploy.atomic`):

* every file is written to a temporary name in the target directory (``.<name>.<pid>-<random>.tmp``,
  so a temp file of a dead process can be recognised and removed) and renamed into place;
* a file never replaces a directory and a directory never replaces a file (one-line refusal);
* an artifact and its manifest are published together by :func:`publishing`: both are written to
  temporary names first (a full disk fails here, leaving the previous state untouched), then the old
  manifest is removed, the artifact renamed into place and the manifest renamed last. A reader can
  therefore see the old pair, the new artifact alone for the instant between the two renames (which
  :meth:`Artifact.load` reports as "has no manifest"), or the new pair, but never an artifact beside
  a manifest that describes another file;
* a per-artifact lock (``fcntl.flock`` on ``.<name>.lock`` beside the artifact) makes a second export
  of the same name fail at once with a message instead of interleaving with the first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .atomic import (
    ArtifactBusy,
    Kind,
    _disk_error,
    _missing_ancestors,
    _move_into_place,
    _refuse_kind_change,
    _remove,
    artifact_lock,
    atomic_path,
    atomic_write_text,
    check_creatable_dir,
    check_output_file,
    check_writable_dir,
    clean_stale_temps,
    temp_name,
)
from .errors import ArtifactError

__all__ = [
    "Artifact",
    "MANIFEST_SUFFIX",
    "manifest_path",
    "atomic_path",
    "atomic_write_text",
    "publishing",
    "Stage",
    "artifact_lock",
    "clean_stale_temps",
    "sha256_path",
    "tool_versions",
    "utc_now",
    "check_writable_dir",
    "check_creatable_dir",
    "check_output_file",
    "read_manifest",
    "ArtifactBusy",
]

MANIFEST_SUFFIX = ".manifest.json"
SCHEMA_VERSION = 1
# Files an OS or a file manager drops into folders (Finder, Explorer, macOS zip): never part of a package.
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "Icon\r"})
JUNK_DIRS = frozenset({"__MACOSX"})


def manifest_path(artifact_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.manifest.json`` (also for ``.mlpackage`` directories)."""
    p = Path(artifact_path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_junk(relative: Path) -> bool:
    """True for OS clutter inside a package folder (``.DS_Store``, ``._*`` resource forks, ``__MACOSX``)."""
    return (relative.name in JUNK_NAMES or relative.name.startswith("._")
            or any(part in JUNK_DIRS for part in relative.parts))


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, in sorted order).

    In a directory, OS clutter (:func:`is_junk`: ``.DS_Store``, ``._*``, ``__MACOSX``) is ignored, so
    opening a ``.mlpackage`` in Finder does not make it "stale".
    """
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_file():
        files = [p]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not is_junk(f.relative_to(p)))
    for f in files:
        if p.is_dir():
            digest.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tool_versions(*modules: str) -> dict[str, str]:
    """Versions of the toolchain and of the given modules that are importable."""
    from importlib import metadata

    from . import __version__

    out = {"nextvit-deploy": __version__}
    for name in ("torch", "onnx", "onnxruntime", *modules):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Stage:
    """What :func:`publishing` yields: write the artifact to ``path``, then call :meth:`publish`."""

    final: Path
    path: Path
    published: bool = False
    _manifest_tmp: Path | None = None

    def publish(self, art: Artifact) -> Artifact:
        """Write the manifest of ``art`` (whose ``sha256`` describes ``path``), then move both into place."""
        art = art.replace(path=self.final)
        text = json.dumps(art.to_dict(), indent=2, sort_keys=True) + "\n"
        manifest = manifest_path(self.final)
        _refuse_kind_change(manifest, "file")
        _refuse_kind_change(self.final, "dir" if self.path.is_dir() else "file")
        self._manifest_tmp = temp_name(manifest)
        try:
            self._manifest_tmp.write_text(text)
            if manifest.exists() or manifest.is_symlink():
                manifest.unlink()  # from here a reader sees "no manifest", never a manifest of other bytes
            _move_into_place(self.path, self.final)
            os.replace(self._manifest_tmp, manifest)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
                raise _disk_error(exc, manifest) from None
            raise
        self.published = True
        return art


@contextlib.contextmanager
def publishing(final: str | Path, *, kind: Kind = "file") -> Iterator[Stage]:
    """Lock ``final``, yield a :class:`Stage` whose ``path`` the exporter writes, and clean up on failure.

    ``stage.publish(artifact)`` publishes the artifact and its manifest together (see the module
    docstring for the order). Anything not published is removed when the block exits.
    """
    final = Path(final)
    created = _missing_ancestors(final.parent)
    check_writable_dir(final.parent)
    _refuse_kind_change(final, kind)
    stage: Stage | None = None
    try:
        with artifact_lock(final):
            clean_stale_temps(final)
            clean_stale_temps(manifest_path(final))
            stage = Stage(final=final, path=temp_name(final))
            try:
                yield stage
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise _disk_error(exc, final) from None
                raise
            finally:
                _remove(stage.path)
                if stage._manifest_tmp is not None:
                    _remove(stage._manifest_tmp)
    finally:
        if stage is None or not stage.published:
            for d in created:  # folders this export made, deepest first, if nothing else went into them
                with contextlib.suppress(OSError):
                    d.rmdir()


def read_manifest(artifact_path: str | Path) -> dict[str, Any] | None:
    """The raw manifest beside ``artifact_path``, or None when there is none or it is not JSON."""
    m = manifest_path(artifact_path)
    try:
        raw = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


@dataclass(frozen=True)
class Artifact:
    """An exported model and everything needed to rebuild its PyTorch reference.

    ``input_shape`` is ``(batch_opt, 3, height, width)``; ``batch`` is ``(min, opt, max)`` and
    ``dynamic_batch`` says whether the file accepts every batch in that range. The reference model is
    rebuilt from ``checkpoint`` (path + ``checkpoint_sha256``) or, without one, from ``seed`` (random
    weights with realistic BatchNorm statistics, see ``reference.py``).
    """

    path: Path
    target: str
    precision: str
    variant: str
    input_shape: tuple[int, int, int, int]
    batch: tuple[int, int, int]
    dynamic_batch: bool
    features_only: bool
    input_name: str
    output_names: tuple[str, ...]
    preprocessing: dict[str, Any]
    sha256: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_hub: dict[str, str] | None = None  # hf-hub checkpoints: repo_id, revision (commit), filename
    seed: int | None = None
    depths: tuple[int, int, int, int] | None = None  # only for non-standard (test) depths
    num_classes: int = 1000
    opset: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created_utc: str = field(default_factory=utc_now)
    details: dict[str, Any] = field(default_factory=dict)  # target-specific facts (fp32 nodes, engine info, ...)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_shape[2], self.input_shape[3]

    @property
    def manifest(self) -> Path:
        return manifest_path(self.path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = self.path.name  # manifests sit next to their artifact: store the name, not a host path
        d["schema_version"] = SCHEMA_VERSION
        return d

    def save_manifest(self) -> Path:
        """Write the manifest atomically (call this last, after the artifact itself is in place)."""
        atomic_write_text(self.manifest, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return self.manifest

    def replace(self, **changes: Any) -> Artifact:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | Path, *, check_sha: bool = True) -> Artifact:
        """Read the artifact at ``path`` from its manifest, checking that the file is the one described.

        Checks, each a one-line :class:`ArtifactError`: the manifest is JSON with known, well-typed fields
        (:func:`~nextvit_deploy.manifest.validate_fields`), its target matches the file type, the sha256
        matches, and for ONNX files the graph agrees with the manifest on names, input shape, class
        count and precision (:func:`~nextvit_deploy.manifest.check_onnx_contents`).
        """
        p = Path(path)
        if p.name.endswith(MANIFEST_SUFFIX):
            p = p.with_name(p.name[: -len(MANIFEST_SUFFIX)])
        if not p.exists():
            raise ArtifactError(f"artifact {p} does not exist: check the path or export it first")
        m = manifest_path(p)
        if not m.is_file():
            raise ArtifactError(
                f"{p} has no manifest ({m.name}): export it with nextvit-deploy export, which writes one")
        try:
            raw = json.loads(m.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"manifest {m} is not readable JSON ({type(exc).__name__}): re-export the artifact") \
                from None
        if not isinstance(raw, dict):
            raise ArtifactError(f"manifest {m} is malformed (not a JSON object): re-export the artifact")
        raw.pop("schema_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ArtifactError(f"manifest {m} is malformed (unknown fields {unknown}): re-export the artifact")
        from .manifest import check_suffix, validate_fields

        validate_fields(raw, m)
        check_suffix(raw["target"], p)
        raw["path"] = p
        for key in ("input_shape", "batch", "output_names", "depths"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        try:
            art = cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"manifest {m} is malformed ({exc}): re-export the artifact") from None
        if check_sha and sha256_path(p) != art.sha256:
            raise ArtifactError(f"{p} does not match its manifest (sha256 differs): re-export it")
        if check_sha and p.suffix == ".onnx" and p.is_file():
            from .manifest import check_onnx_contents

            check_onnx_contents(art)
        return art
