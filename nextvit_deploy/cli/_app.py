"""The ``nextvit-deploy`` command line. This file only wires commands; each lives in its own module."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer

try:  # typer >= 0.22 vendors click as typer._click; its exceptions are not the installed click's
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click  # type: ignore[no-redef]
from typer.core import TyperGroup

from .bench import EXAMPLES as BENCH_EXAMPLES
from .bench import bench
from .doctor import doctor_cmd
from .eval import EXAMPLES as EVAL_EXAMPLES
from .eval import eval_cmd
from .export import EXAMPLES as EXPORT_EXAMPLES
from .export import export_cmd
from .serve import EXAMPLES as SERVE_EXAMPLES
from .serve import serve_cmd
from .triton_repo import EXAMPLES as TRITON_REPO_EXAMPLES
from .triton_repo import triton_repo_cmd
from .verify import verify_cmd


def _usage_line(exc: click.ClickException) -> str:
    """click's message plus where to look, on one line (typer's default is a 5-6 line box)."""
    text = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "nextvit-deploy --help"
    return f"error: {text} (see {where})"


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())
_Abort = tuple(t for t in (getattr(click.exceptions, "Abort", None), getattr(typer, "Abort", None)) if t)


class OneLineGroup(TyperGroup):
    """The root command: usage errors become one line on stderr with exit 2, Ctrl-C one line with 130."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:
            try:
                sys.stdout.write(exc.format_message() + "\n")
            except BrokenPipeError:
                pass
            rv = 2
        except click.ClickException as exc:
            sys.stderr.write(_usage_line(exc) + "\n")
            rv = exc.exit_code
        except (*_Abort, KeyboardInterrupt):
            sys.stderr.write("interrupted; no artifact was written\n")
            rv = 130
        code = rv if isinstance(rv, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    cls=OneLineGroup,
    name="nextvit-deploy",
    help="Next-ViT from PyTorch to ONNX, TensorRT and Core ML: export, verify parity, measure latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("export", epilog=EXPORT_EXAMPLES)(export_cmd)
app.command("verify")(verify_cmd)
app.command("eval", epilog=EVAL_EXAMPLES)(eval_cmd)
app.command("doctor")(doctor_cmd)
app.command("bench", epilog=BENCH_EXAMPLES)(bench)
app.command("triton-repo", epilog=TRITON_REPO_EXAMPLES)(triton_repo_cmd)
app.command("serve", epilog=SERVE_EXAMPLES)(serve_cmd)
