"""``nextvit-deploy bench``: the paper's latency table on this machine, as ratios beside the published ones.

Exit 0 when every requested row was measured, 1 when some failed (listed), 2 on a user error.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from ..bench.types import BenchProgress
from ._common import DEFAULT_PRECISION, OptionalBatchOpt, OptionalImageSizeOpt, PrecisionName, err, handle_errors, out

__all__ = ["bench", "EXAMPLES"]

EXAMPLES = """Examples:

  nextvit-deploy bench --batch 8                       # default subset, every backend present, fp32 + int8 rows

  nextvit-deploy bench --batch 1 --no-int8             # fp32 only (fp16 too on GPU backends)

  nextvit-deploy bench --models nextvit_small,resnet101 --backends onnxruntime --duration 2

  nextvit-deploy bench --task det --models nextvit_small,resnet101 --out results/det   # backbone at 512x512

  nextvit-deploy bench --full --out results/full       # every published row timm can build

  nextvit-deploy bench build/*.onnx --rounds 7         # exported artifacts, ratios against the first

  nextvit-deploy bench fp32.onnx int8.onnx --baseline fp32.onnx --batch 8
"""


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


class _RichProgress(BenchProgress):
    """BenchProgress drawn as a rich progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        self._bar: Any = None  # a rich Progress when stderr is a terminal
        self._task: Any = None
        self._last = ""

    def __enter__(self) -> _RichProgress:
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, total: int) -> None:
        if self._bar is not None:
            self._task = self._bar.add_task("bench", total=total)

    def step(self, description: str, advance: int = 0) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=description, advance=advance)
        elif advance and description != self._last:
            err.print(f"[dim]- {escape(description)}[/]", highlight=False)
            self._last = description

    def note(self, message: str) -> None:
        err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def _table(report) -> object:
    from rich.table import Table

    def f(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    def flag(v):
        return {"flip": "[bold red]flip[/]", "flip~": "[yellow]flip~[/]", "": "same"}.get(v, "–") if v is not None \
            else "–"

    cfg = report.config
    h, w = cfg.size
    t = Table(title=f"latency per batch of {cfg.batch}, {cfg.precision}, {h}x{w} ({cfg.task})", show_lines=False)
    t.add_column("model", no_wrap=True)
    t.add_column("backend", no_wrap=True)
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (("median ms", "right"), ("p90", "right"),
                      ("p99", "right"), ("img/s", "right"), ("GMACs", "right"), ("GF/s", "right"),
                      ("% peak", "right"), ("paper TRT ms", "right"), ("×R101", "right"), ("paper ×R101", "right"),
                      ("", "left"), ("×NV-S", "right"), ("paper ×NV-S", "right"), (" ", "left"))
    for col, just in columns:
        t.add_column(col, justify=just)
    for r in report.rows:
        s = r.latency.stats
        backend = r.backend if r.latency.precision == cfg.precision else f"{r.backend} {r.latency.precision}"
        t.add_row(r.display, backend, f(s.median_ms, ".1f"), f(s.p90_ms, ".1f"), f(s.p99_ms, ".1f"),
                  f(r.throughput_ips, ".2f"), f(r.gmacs), f(r.achieved_gflops, ".1f"),
                  r.peak_note or ("–" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%"),
                  f(r.paper_trt_ms, ".1f"),
                  f(r.ratio_resnet101), f(r.paper_ratio_resnet101), flag(r.flag_resnet101),
                  f(r.ratio_nextvit_s), f(r.paper_ratio_nextvit_s), flag(r.flag_nextvit_s))
    return t


def _static_batch(text: str | None) -> int | None:
    from ..errors import BadInput
    from ..export import parse_batch

    if text is None:
        return None
    lo, opt, hi = parse_batch(text)
    if not lo == opt == hi:
        raise BadInput(f"bench times one batch size, got the range {text}: pass a single --batch, e.g. --batch {opt}")
    return opt


@handle_errors
def bench(
    artifacts: Annotated[list[Path] | None, typer.Argument(
        help="Exported artifacts (.onnx, TensorRT-ready .onnx, .engine, .mlpackage) to time side by side. "
             "Default: the paper's table on models bench builds itself.", show_default=False)] = None,
    batch: OptionalBatchOpt = None,
    models: Annotated[str | None, typer.Option(
        "--models", help="Comma-separated timm names or paper names. Default: the task's subset.")] = None,
    backends: Annotated[str | None, typer.Option(
        "--backends", help="Comma-separated: torch, torch-cudagraph, onnxruntime, tensorrt, coreml. "
                           "Default: every backend this machine has.")] = None,
    precision: Annotated[PrecisionName, typer.Option(
        "--precision", "-p", help="fp32 or fp16: the precision of the ratio columns (fp32 rows are always timed, "
                                  "as the base of every speed-up; artifacts carry their own).")] = DEFAULT_PRECISION,
    image_size: OptionalImageSizeOpt = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Discarded runs per row.")] = 1,
    iters: Annotated[int, typer.Option("--iters", help="Timed runs wanted per row.")] = 20,
    rounds: Annotated[int, typer.Option(
        "--rounds", help="Interleaved rounds: rows alternate A, B, C, A, B, C, ... (ratios get a spread).")] = 5,
    duration: Annotated[float, typer.Option(
        "--duration", help="Seconds after which a row may stop before --iters (at least 3 runs per round); "
                           "0 = exactly --iters runs.")] = 5.0,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads. Default: all cores.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for bench.json/.csv/.md/.png.")] = Path("bench"),
    full: Annotated[bool, typer.Option("--full", help="Every published row that timm can build.")] = False,
    task: Annotated[str, typer.Option("--task", help="cls (classifier) or det (backbone, the det/seg rows).")] = "cls",
    simplify: Annotated[bool | None, typer.Option(
        "--simplify/--no-simplify", help="Run the ONNX simplifier. Default: only when TensorRT runs.")] = None,
    int8: Annotated[bool | None, typer.Option(
        "--int8/--no-int8", help="INT8 rows per model in the backend's convention (ONNX Runtime x86 QDQ on the CPU, "
                                 "TensorRT Q/DQ), with their speed-up over fp32. Default: on; --no-int8 skips the "
                                 "calibration and quantization they cost.", show_default=False)] = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="With artifacts: the one every ratio divides by. Default: the first.")] = None,
) -> None:
    """Measure Next-ViT and the paper's baselines on every backend here (ratios beside the published ones),
    with fp32, fp16 (GPU backends) and int8 rows per backend, or time exported artifacts side by side."""
    from ..bench import BenchConfig, bench_artifacts
    from ..bench import bench as run_bench
    from ..errors import BadInput
    from ..export import parse_image_size

    if duration < 0:
        raise BadInput(f"--duration must be 0 or more seconds, got {duration}")
    if rounds < 1:
        raise BadInput(f"--rounds must be at least 1, got {rounds}")
    static = _static_batch(batch)
    if static is not None and not 1 <= static <= 256:
        raise BadInput(f"--batch must be 1 to 256, got {static}")
    from ..artifact import check_creatable_dir

    if artifacts:
        for flag, value in (("--models", models), ("--backends", backends), ("--image-size", image_size),
                            ("--full", full or None), ("--simplify/--no-simplify", simplify),
                            ("--int8/--no-int8", int8)):
            if value is not None:
                raise BadInput(f"{flag} applies to the table bench builds itself, not to artifacts: drop {flag}")
        check_creatable_dir(out_dir)
        with _RichProgress() as progress:
            report = bench_artifacts(artifacts, baseline=baseline, batch=static, warmup=warmup, iters=iters,
                                     rounds=rounds, duration_s=duration or None, threads=threads, progress=progress)
        _print_report(report, out_dir)
        return
    if baseline is not None:
        raise BadInput("--baseline needs artifacts: pass the exported files, e.g. bench a.onnx b.onnx --baseline a.onnx")
    if task not in ("cls", "det"):
        raise BadInput(f"unknown --task {task!r}: choose cls or det")
    if full and models:
        raise BadInput("--full and --models conflict: use --full for every published row, or --models for a list")
    for flag, value in (("--models", models), ("--backends", backends)):
        if value is not None and not _split(value):
            raise BadInput(f"{flag} is empty: name at least one, or leave {flag} out for the default")
    size = parse_image_size(image_size) if image_size else None
    if size is not None:
        from nextvit_model import InputSizeError, check_input_size

        try:
            check_input_size(*size)
        except InputSizeError as exc:
            raise BadInput(f"{exc} (pass --image-size)") from None
        if max(size) > 2048:
            raise BadInput(f"--image-size {size[0]}x{size[1]} is above the limit of 2048 pixels a side: "
                           "use a smaller --image-size")
    check_creatable_dir(out_dir)  # created only when the results are written: a refused run leaves no folder
    cfg = BenchConfig(models=_split(models), backends=_split(backends), batch=static or 8,
                      precision=PrecisionName(precision).value, image_size=size, warmup=warmup, iters=iters,
                      duration_s=duration or None, threads=threads, task=task, full=full, simplify=simplify,
                      rounds=rounds, int8=True if int8 is None else int8)
    with _RichProgress() as progress:
        report = run_bench(cfg, progress=progress)
    _print_report(report, out_dir)


def _print_report(report, out_dir: Path) -> None:
    from ..bench import write_outputs

    out.print(_artifact_table(report) if report.artifacts else _table(report))
    for r in report.rows:
        if r.speedup_vs_fp32 is not None:
            out.print(f"{r.display} on {r.backend} {r.latency.precision}: {r.speedup_vs_fp32:.2f}x the "
                      f"{report.config.precision} row", highlight=False)
    for b in report.backends:
        if not b.available:
            out.print(f"skipped {b.name}: {escape(b.reason)}", highlight=False)
    for s in report.skipped_precisions:
        out.print(f"not run: {s['backend']} {s['precision']} ({escape(s['reason'])})", highlight=False)
    for p in report.peaks:
        shape = "x".join(map(str, p.shape))
        out.print(f"GEMM peak {p.backend} {p.precision}: {p.gflops:.1f} GFLOP/s (best of {len(p.sweep)} shapes: "
                  f"{shape} MxKxN, {p.device})", highlight=False)
    for f in report.failures:
        out.print(f"[red]failed[/] {f['model']} on {f['backend']}: {escape(f['error'])}", highlight=False)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    paths = write_outputs(report, out_dir)
    out.print(f"measured on {report.labels['cpu']} ({report.labels['threads']} threads) in {report.wall_s:.0f} s; "
              f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)
    raise typer.Exit(0 if report else 1)


def _artifact_table(report) -> object:
    from rich.table import Table

    base = report.rows[0].baseline if report.rows else ""
    t = Table(title=f"latency per batch, {report.config.rounds} interleaved rounds; ratios against {base}")
    for col in ("artifact", "runner", "precision", "batch", "median ms", "p90", "img/s", "% peak", "× base", "spread"):
        t.add_column(col, justify="left" if col in ("artifact", "runner", "precision") else "right", no_wrap=True)
    for r in report.rows:
        s = r.latency.stats
        peak = r.peak_note or ("–" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%")
        spread = "–" if r.spread_baseline is None else f"±{100 * r.spread_baseline:.0f}%"
        t.add_row(r.display, r.backend, r.latency.precision, str(r.latency.batch), f"{s.median_ms:.2f}",
                  f"{s.p90_ms:.2f}", f"{r.throughput_ips:.1f}", peak, f"{r.ratio_baseline:.2f}", spread)
    return t
