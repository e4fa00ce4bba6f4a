"""The ``nextvit-deploy`` command line. This file only wires commands; each lives in its own module."""
from __future__ import annotations

import typer

from .bench import EXAMPLES as BENCH_EXAMPLES
from .bench import bench
from .doctor import doctor_cmd
from .export import EXAMPLES as EXPORT_EXAMPLES
from .export import export_cmd
from .serve import EXAMPLES as SERVE_EXAMPLES
from .serve import serve_cmd
from .triton_repo import EXAMPLES as TRITON_REPO_EXAMPLES
from .triton_repo import triton_repo_cmd
from .verify import verify_cmd

app = typer.Typer(
    name="nextvit-deploy",
    help="Next-ViT from PyTorch to ONNX, TensorRT and Core ML: export, verify parity, measure latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("export", epilog=EXPORT_EXAMPLES)(export_cmd)
app.command("verify")(verify_cmd)
app.command("doctor")(doctor_cmd)
app.command("bench", epilog=BENCH_EXAMPLES)(bench)
app.command("triton-repo", epilog=TRITON_REPO_EXAMPLES)(triton_repo_cmd)
app.command("serve", epilog=SERVE_EXAMPLES)(serve_cmd)


def main() -> None:
    app()
