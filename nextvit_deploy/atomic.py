"""Writes that never leave half a file and never destroy what they did not create: a temporary name in the
target folder (``.<name>.<pid>-<random>.tmp``, so a dead process's temp file is recognised and removed), a
rename into place, no file replacing a folder (or the reverse), a per-artifact lock, and the up-front checks
on output paths (``--out``, ``--json``). :mod:`nextvit_deploy.artifact` publishes an artifact with its
manifest on top of these."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from .errors import ArtifactError, BadInput

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")

Kind = Literal["file", "dir"]


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
    removed: list[Path] = []
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


def _missing_ancestors(d: Path) -> list[Path]:
    """The folders ``mkdir -p d`` would create, deepest first."""
    out = []
    while not (d.exists() or d.is_symlink()) and d.parent != d:
        out.append(d)
        d = d.parent
    return out


def check_output_file(path: str | Path, *, flag: str = "--json") -> Path:
    """Before any work: ``path`` must not be a folder, and its folder must exist or be creatable."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise BadInput(f"{flag} {p} is a folder; refusing to replace it with a file: "
                       f"pass a file path such as {p / 'result.json'}")
    check_creatable_dir(p.parent, flag=flag)
    return p
