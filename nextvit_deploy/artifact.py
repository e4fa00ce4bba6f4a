"""Artifacts: an exported file (or package directory) plus ``<name>.manifest.json`` describing it.

A file without a manifest is not an artifact. Writes are atomic and never destroy what they did not
create:

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
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from .errors import ArtifactError, BadInput

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
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")

Kind = Literal["file", "dir"]


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


def _broken_link(d: Path) -> bool:
    return d.is_symlink() and not d.exists()


def check_writable_dir(directory: str | Path, *, flag: str | None = "--out") -> Path:
    """Create ``directory`` if needed and check it can be written, with a one-line error otherwise.

    ``flag`` is the option the user can change (named in the message); None says "another folder".
    """
    d = Path(directory)
    fix = f"choose another {flag}" if flag else "choose another folder"
    if _broken_link(d):
        raise BadInput(f"output directory {d} is a broken or looping symlink: remove it or {fix}")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BadInput(f"output directory {d} is a file, not a folder: {fix}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput(f"output directory {d} goes through a symlink loop: {fix}") from None
        raise BadInput(f"output directory {d} cannot be created ({exc.strerror}): {fix}") from None
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise BadInput(f"output directory {d} is not writable: {fix}")
    return d


def check_creatable_dir(directory: str | Path, *, flag: str = "--out") -> Path:
    """Check that ``directory`` exists and is writable, or could be created, *without creating it*.

    Used before work starts so that a run refused for another reason leaves no empty folder behind.
    """
    d = Path(directory)
    probe = d
    while True:
        if _broken_link(probe):
            raise BadInput(f"output directory {d} cannot be created ({probe} is a broken or looping symlink): "
                           f"remove it or choose another {flag}")
        try:
            exists = probe.exists()
        except OSError as exc:  # ELOOP and friends
            raise BadInput(f"output directory {d} cannot be created ({exc.strerror}): choose another {flag}") from None
        if exists:
            break
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"output directory {d} cannot be created ({probe} is a file, not a folder): "
                       f"choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"output directory {d} is not writable ({probe} is read-only for you): choose another {flag}")
    return d


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def temp_name(final: Path) -> Path:
    """Hidden temp name beside ``final`` that carries this process's pid (see :func:`clean_stale_temps`)."""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def clean_stale_temps(final: str | Path) -> list[Path]:
    """Remove the temp files of ``final`` left by processes that no longer exist (SIGKILL, power loss).

    Only names this module creates (``.<name>.<pid>-<8 hex>.tmp``) are touched, and only when that pid
    is dead. Returns the removed paths.
    """
    final = Path(final)
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and m.group("name") == final.name and not _pid_alive(int(m.group("pid"))):
            _remove(entry)
            removed.append(entry)
    return removed


def _refuse_kind_change(final: Path, kind: Kind) -> None:
    """A file never replaces a directory, a directory never replaces a file."""
    if final.is_symlink():
        return  # os.replace swaps the link itself, never what it points to
    if kind == "file" and final.is_dir():
        raise BadInput(f"{final} is a folder; refusing to replace it with a file: "
                       f"pass a file path such as {final / 'result.json'}")
    if kind == "dir" and final.exists() and not final.is_dir():
        raise BadInput(f"{final} is a file; refusing to replace it with a folder: move it away or write elsewhere")


def _move_into_place(tmp: Path, final: Path) -> None:
    """``os.replace`` for files; a directory is swapped in through a second temp name (rename, rename, delete)."""
    if tmp.is_dir() and final.is_dir() and not final.is_symlink():
        old = temp_name(final)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _disk_error(exc: OSError, final: Path) -> BadInput:
    return BadInput(f"cannot write {final} ({exc.strerror or type(exc).__name__}): "
                    "free some space or write to another folder")


@contextlib.contextmanager
def atomic_path(final: str | Path, *, kind: Kind = "file") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``, else remove it.

    Args:
        final: where the result goes.
        kind: ``"file"`` or ``"dir"`` (a ``.mlpackage``): what the caller will write. A file never replaces
            a folder and a folder never replaces a file; both are refused before any work. Defaults to "file".

    Raises:
        BadInput: ``final`` is of the other kind, its folder cannot be written, or the disk is full.
    """
    final = Path(final)
    check_writable_dir(final.parent, flag=None)
    _refuse_kind_change(final, kind)
    clean_stale_temps(final)
    tmp = temp_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        _refuse_kind_change(final, "dir" if tmp.is_dir() else "file")
        _move_into_place(tmp, final)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            raise _disk_error(exc, final) from None
        raise
    finally:
        _remove(tmp)


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


class ArtifactBusy(ArtifactError):
    """Another process holds the lock of this artifact name."""


@contextlib.contextmanager
def artifact_lock(final: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock for the artifact name ``final`` (``fcntl.flock`` on ``.<name>.lock``).

    A second holder fails at once with :class:`ArtifactBusy` naming the pid that holds it. The lock file
    is removed on release; a holder re-checks after locking that the file it locked is still the one on
    disk, so removal cannot let two processes in at once.
    """
    final = Path(final)
    lock = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ArtifactBusy(f"another export is writing {final} right now (pid {holder}): wait for it to "
                               "finish or write elsewhere with --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its previous holder had just removed: try again
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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


def _missing_ancestors(d: Path) -> list[Path]:
    """The folders ``mkdir -p d`` would create, deepest first."""
    out = []
    while not (d.exists() or d.is_symlink()) and d.parent != d:
        out.append(d)
        d = d.parent
    return out


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



def check_output_file(path: str | Path, *, flag: str = "--json") -> Path:
    """Before any work: ``path`` must not be a folder, and its folder must exist or be creatable."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise BadInput(f"{flag} {p} is a folder; refusing to replace it with a file: "
                       f"pass a file path such as {p / 'result.json'}")
    check_creatable_dir(p.parent, flag=flag)
    return p
