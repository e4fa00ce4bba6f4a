"""``nextvit-deploy triton-repo``: a Triton model repository (config.pbtxt + model file) for artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ._common import handle_errors, out

EXAMPLES = """
Examples:

  nextvit-deploy triton-repo build/nextvit_small-onnx-fp32-224.onnx --out model_repository

  nextvit-deploy triton-repo build/*.engine build/*.onnx --out model_repository --instances 2

  nextvit-deploy triton-repo model.onnx --out repo --kind cpu --max-queue-delay-us 500 --preferred-batch 4,8

  nextvit-deploy triton-repo model.onnx --out repo --image-input   # + preprocessing model and ensemble
"""


@handle_errors
def triton_repo_cmd(
    artifacts: Annotated[list[Path], typer.Argument(help="Exported .onnx / .engine files with their manifests.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model repository folder (created if missing).")],
    name: Annotated[str | None, typer.Option(help="Model name (one artifact only). Default: the file name.")] = None,
    instances: Annotated[int, typer.Option(help="Model instances per device (instance_group count).")] = 1,
    kind: Annotated[str, typer.Option(help="'gpu' (KIND_GPU) or 'cpu' (KIND_CPU, ONNX only).")] = "gpu",
    max_queue_delay_us: Annotated[int, typer.Option(
        help="Dynamic batcher: longest wait to fill a batch, microseconds.")] = 100,
    preferred_batch: Annotated[str | None, typer.Option(
        help="Dynamic batcher: preferred batch sizes, e.g. 4,8 (inside the artifact's range). "
             "Default: the profile's opt and max.")] = None,
    dynamic_batching: Annotated[bool, typer.Option(help="Add dynamic_batching for dynamic-batch artifacts.")] = True,
    image_input: Annotated[bool, typer.Option(
        help="Also write <name>_preprocess (Python backend, encoded image bytes -> tensor) and the ensemble "
             "<name>_image. The server's Python needs: pip install --no-deps nextvit-deploy pillow")] = False,
) -> None:
    """Write a standard Triton model repository: <name>/config.pbtxt and <name>/1/model.onnx or model.plan.

    Static-batch artifacts get max_batch_size 0 with full dims (every request carries exactly that batch).
    """
    from ..artifact import Artifact
    from ..errors import BadInput
    from ..serve.repo import RepoOptions, write_repository

    if kind not in ("gpu", "cpu"):
        raise BadInput(f"--kind must be 'gpu' or 'cpu', got {kind!r}")
    sizes = None
    if preferred_batch:
        try:
            sizes = tuple(int(s) for s in preferred_batch.split(","))
        except ValueError:
            raise BadInput(f"--preferred-batch {preferred_batch!r} is not a list of numbers: use e.g. 4,8") from None
    opts = RepoOptions(instances=instances, kind=kind, max_queue_delay_us=max_queue_delay_us,  # type: ignore[arg-type]
                       dynamic_batching=dynamic_batching, preferred_batch_sizes=sizes, image_input=image_input)
    arts = [Artifact.load(p) for p in artifacts]
    folders = write_repository(arts, out_dir, names=[name] if name else None, options=opts)
    for a, folder in zip(arts, folders):
        batch = f"max_batch_size {a.batch[2]}" if a.dynamic_batch else f"static batch {a.batch[0]} (max_batch_size 0)"
        extra = f" (+ {folder.name}_preprocess, {folder.name}_image)" if image_input else ""
        out.print(f"{escape(str(folder))}: {escape(a.path.name)}, {batch}{extra}", highlight=False)
    out.print(f"serve it with: tritonserver --model-repository {escape(str(out_dir.resolve()))}", highlight=False)
