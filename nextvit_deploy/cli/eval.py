"""``nextvit-deploy eval``: accuracy on a labelled folder; exit 0 ok, 1 top-1 drop beyond --max-drop, 2 user error."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import JsonOpt, err, handle_errors, out

EXAMPLES = """Examples:

  nextvit-deploy eval out/nextvit_small_onnx_int8_224.onnx --data val/ --max-drop 1.0

  nextvit-deploy eval model.mlpackage --data val/ --limit 500 --batch 8 --json eval.json
"""


def _progress_bar(total_hint: str):
    """A rich progress bar with images/s on a terminal, one line per 10 % in logs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not sys.stderr.isatty():
        state = {"next": 0.0}

        def log(done: int, total: int) -> None:
            if done >= state["next"] * total or done == total:
                err.print(f"[dim]- {done}/{total} images[/]", highlight=False)
                state["next"] += 0.1
        return None, log
    bar = Progress(TextColumn(total_hint), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), console=err, transient=True)
    task = bar.add_task(total_hint, total=None, rate="")
    import time

    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        bar.update(task, completed=done, total=total, rate=f"{rate:6.1f} images/s")
    return bar, update


@handle_errors
def eval_cmd(
    artifact: Annotated[Path, typer.Argument(help="Exported file (.onnx, .engine, .mlpackage) with its manifest.")],
    data: Annotated[Path, typer.Option("--data", help="ImageFolder: one sub-folder of images per class.")],
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="Class order: one folder name per line (line i = class i), or JSON {folder: index}. "
                         "Default: sorted folder names.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate this many images, spread over all classes.")]
    = None,
    batch: Annotated[int | None, typer.Option("--batch", "-b", help="Images per inference call.")] = None,
    max_drop: Annotated[float | None, typer.Option(
        "--max-drop", help="Fail (exit 1) when top-1 drops more than this many points below PyTorch.")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Top-1/top-5 of the artifact and of its PyTorch reference on your labelled images."""
    from ..artifact import check_output_file
    from ..errors import BadInput
    from ..evaluate import evaluate_artifact
    from ..report import write_json
    from ..verify import load_artifact

    if max_drop is not None and not max_drop >= 0:
        raise BadInput(f"--max-drop must be a number of points >= 0, got {max_drop}")
    if json_path is not None:
        check_output_file(json_path)
    art = load_artifact(artifact)
    err.print(f"[dim]- rebuilding the PyTorch reference of {art.path.name} from the manifest[/]", highlight=False)
    bar, update = _progress_bar(f"eval {art.path.name}")
    if bar is not None:
        with bar:
            report = evaluate_artifact(art, data, labels=labels, limit=limit, batch=batch, progress=update)
    else:
        report = evaluate_artifact(art, data, labels=labels, limit=limit, batch=batch, progress=update)
    _print(report)
    if json_path:
        write_json(json_path, report.to_dict())
        err.print(f"wrote {json_path}")
    failed = max_drop is not None and report.top1_drop > max_drop
    if failed:
        out.print(f"FAIL: top-1 dropped {report.top1_drop:.2f} points (> --max-drop {max_drop:g})", highlight=False)
    raise typer.Exit(1 if failed else 0)


def _print(report) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{report.artifact}: {report.images} images, {report.classes} classes")
    for col in ("model", "top-1 %", "top-5 %"):
        table.add_column(col)
    table.add_row(escape(report.reference), f"{report.reference_top1:.2f}", f"{report.reference_top5:.2f}")
    table.add_row(escape(f"{report.candidate} [{report.candidate_device}]"), f"{report.candidate_top1:.2f}",
                  f"{report.candidate_top5:.2f}")
    out.print(table)
    out.print(f"top-1 drop {report.top1_drop:+.2f} points, top-1 agreement {report.top1_agreement:.2f} %, "
              f"{report.images_per_s:.1f} images/s", highlight=False)
    if report.skipped:
        shown = "; ".join(f"{s['file']}: {s['reason']}" for s in report.skipped[:5])
        more = f"; and {len(report.skipped) - 5} more" if len(report.skipped) > 5 else ""
        out.print(f"skipped {len(report.skipped)} unreadable files: {shown}{more}", highlight=False)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
