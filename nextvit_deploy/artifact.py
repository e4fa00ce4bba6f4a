"""Artifacts: an exported file (or package directory) plus ``<name>.manifest.json`` describing it.

A file without a manifest is not an artifact. Writes are atomic: every file is written to a temporary
name in the target directory and renamed into place, and the manifest is written last, so an
interrupted export never leaves something that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import ArtifactError, BadInput

__all__ = [
    "Artifact",
    "MANIFEST_SUFFIX",
    "manifest_path",
    "atomic_path",
    "atomic_write_text",
    "sha256_path",
    "tool_versions",
    "utc_now",
    "check_writable_dir",
]

MANIFEST_SUFFIX = ".manifest.json"
SCHEMA_VERSION = 1


def manifest_path(artifact_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.manifest.json`` (also for ``.mlpackage`` directories)."""
    p = Path(artifact_path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    p = Path(path)
    digest = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
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


def check_writable_dir(directory: str | Path) -> Path:
    """Create ``directory`` if needed and check it can be written, with a one-line error otherwise."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"output directory {d} cannot be created ({exc.strerror}): choose another with --out") from None
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise BadInput(f"output directory {d} is not writable: choose another with --out")
    return d


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``, else remove it.

    Works for files and directories (``.mlpackage``). The temporary name starts with ``.`` and carries
    a random part, so concurrent exports do not collide and a crash leaves only a hidden temp name.
    """
    final = Path(final)
    check_writable_dir(final.parent)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


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
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    seed: Optional[int] = None
    depths: Optional[tuple[int, int, int, int]] = None  # only for non-standard (test) depths
    num_classes: int = 1000
    opset: Optional[int] = None
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

    def replace(self, **changes: Any) -> "Artifact":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | Path, *, check_sha: bool = True) -> "Artifact":
        """Read the artifact at ``path`` from its manifest, checking that the file is the one described."""
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
            raw.pop("schema_version", None)
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(raw) - names)
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            raw["path"] = p
            for key in ("input_shape", "batch", "output_names", "depths"):
                if raw.get(key) is not None:
                    raw[key] = tuple(raw[key])
            art = cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"manifest {m} is malformed ({exc}): re-export the artifact") from None
        if check_sha and sha256_path(p) != art.sha256:
            raise ArtifactError(f"{p} does not match its manifest (sha256 differs): re-export it")
        return art


def temp_dir(prefix: str = "nextvit-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
