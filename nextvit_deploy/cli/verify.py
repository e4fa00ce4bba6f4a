"""``nextvit-deploy verify``: exported-vs-PyTorch parity; exit 0 pass, 1 parity failed, 2 user error."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import JsonOpt, err, handle_errors, out, progress_status


@handle_errors
def verify_cmd(
    artifact: Annotated[Path, typer.Argument(help="Exported file (.onnx, .engine, .mlpackage) with its manifest.")],
    json_path: JsonOpt = None,
    max_batch: Annotated[int | None, typer.Option(help="Cap the largest batch compared.")] = None,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="Also compare on your own images (a folder, gated like the photos).")] = None,
    compute_units: Annotated[str | None, typer.Option(
        help="Core ML packages: CPU_ONLY, CPU_AND_GPU, CPU_AND_NE or ALL. Used where Core ML predicts (macOS); "
             "elsewhere the MIL evaluator runs and the report says the units were not used.")] = None,
    accumulate: Annotated[str | None, typer.Option(
        help="Core ML packages on the MIL evaluator: fp32 (fp16 ops computed in fp32, the kinder bound) or "
             "fp16 (computed in fp16, the harsher bound).")] = None,
) -> None:
    """Run the artifact and its PyTorch reference on real photos and noise; gate on cosine and max abs."""
    from ..artifact import check_output_file
    from ..errors import BadInput
    from ..report import parity_summary, parity_table, write_json
    from ..verify import verify

    if max_batch is not None and max_batch <= 0:
        raise BadInput(f"--max-batch must be at least 1, got {max_batch}")
    if json_path is not None:
        check_output_file(json_path)
    options: dict = {}
    if compute_units is not None or accumulate is not None:
        from ..artifact import Artifact

        if Artifact.load(artifact, check_sha=False).target != "coreml":
            raise BadInput("--compute-units and --accumulate apply to Core ML packages (.mlpackage): drop them")
        if accumulate is not None and accumulate not in ("fp32", "fp16"):
            raise BadInput(f"--accumulate {accumulate!r} is not supported: choose fp32 or fp16")
        options = {k: v for k, v in (("compute_units", compute_units), ("accumulate", accumulate)) if v is not None}
    with progress_status(f"verifying {artifact.name}") as say:
        report = verify(artifact, max_batch=max_batch, runner_options=options or None, progress=say, inputs=inputs)
    out.print(parity_table(report))
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    out.print(parity_summary(report), highlight=False)
    if json_path:
        write_json(json_path, report.to_dict())
        err.print(f"wrote {json_path}")
    raise typer.Exit(0 if report else 1)
