"""Shared CLI pieces: option types written once, the error table, the output sinks."""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ..targets import PRECISIONS, TARGETS


# stdout carries results (tables, JSON paths); stderr carries progress, warnings and errors.
def _console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    # Piped output (CI logs) gets a wide, fixed width instead of rich's 80-column fallback.
    return probe if probe.is_terminal else Console(stderr=stderr, width=150)


out = _console()
err = _console(stderr=True)

TargetName = Enum("TargetName", {name: name for name in TARGETS}, type=str)  # type: ignore[misc]
PrecisionName = Enum("PrecisionName", {p: p for p in PRECISIONS}, type=str)  # type: ignore[misc]
DEFAULT_TARGET: Any = TargetName("onnx")  # Any: the Enums are built at run time, mypy cannot see their members
DEFAULT_PRECISION: Any = PrecisionName("fp32")

VariantOpt = Annotated[str, typer.Option("--variant", "-m", help="nextvit_small|base|large (or s, b, l).")]
ImageSizeOpt = Annotated[str, typer.Option("--image-size", "-s", help="224 or HEIGHTxWIDTH, e.g. 256x320.")]
BatchOpt = Annotated[str, typer.Option("--batch", "-b", help="Static batch (8) or dynamic range min:max / min:opt:max.")]
# The same options where the command picks the default itself (bench: the task's batch and image size).
OptionalImageSizeOpt = Annotated[str | None, typer.Option("--image-size", "-s", help="224 or HEIGHTxWIDTH, e.g. 256x320.")]
OptionalBatchOpt = Annotated[str | None, typer.Option(
    "--batch", "-b", help="Static batch (8) or dynamic range min:max / min:opt:max.")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", "-c", help="Official, detection/segmentation or timm checkpoint (.pth/.bin/.safetensors), or "
                               "hf-hub:ORG/NAME[@REV], e.g. hf-hub:timm/nextvit_small.bd_in1k. Default: random weights.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON to this path.")]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _error_types() -> tuple[type[BaseException], ...]:
    from nextvit_model import CheckpointError, InputSizeError, UnknownVariantError

    from ..errors import DeployError

    # Order matters only for readability: every entry prints its message on one line and exits 2.
    return DeployError, CheckpointError, InputSizeError, UnknownVariantError


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one line on stderr and exit code 2 (traceback with NEXTVIT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _error_types() as exc:
            if os.environ.get("NEXTVIT_DEBUG") == "1":
                raise
            err.print(f"[bold red]error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; no artifact was written")
            raise typer.Exit(130) from None
        except OSError as exc:  # full disk, read-only folder, ...: the user's to fix, one line
            if os.environ.get("NEXTVIT_DEBUG") == "1":
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            err.print(f"[bold red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}: free some space, fix the "
                      "permissions or write to another folder", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, SystemExit):
            raise
        except Exception as exc:  # a bug: one line, and how to see the traceback
            if os.environ.get("NEXTVIT_DEBUG") == "1":
                raise
            err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(_one_line(exc))[:300]} "
                      "(a bug; NEXTVIT_DEBUG=1 shows the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@contextmanager
def progress_status(initial: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr; yields ``say(message)`` that updates it and logs the step."""
    if not sys.stderr.isatty():
        yield lambda msg: err.print(f"[dim]- {msg}[/]", highlight=False)
        return
    with err.status(initial) as status:
        def say(msg: str) -> None:
            err.print(f"[dim]- {msg}[/]", highlight=False)
            status.update(msg)
        yield say
