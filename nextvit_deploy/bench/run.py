"""The default ``bench`` run: validate, prepare every row and peak, time them in interleaved rounds."""
from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .. import published
from .._deps import available
from ..errors import BadInput, DeployError, MissingDependency
from ..latency import TARGET_RUNS, LatencyReport, set_threads
from .machine import backend_status, machine_labels
from .measure import Timed, interleave, prepare_row
from .models import build_bench_model, export_bench_onnx, is_nextvit, largest_gemms, resolve_models
from .peaks import PEAK_BACKENDS, best_peaks, gemm_sweep, peak_fraction, prepare_peaks
from .plan import INT8_CONVENTIONS, coreml_rows, row_batch, row_precisions
from .ratios import wide_spreads, with_ratios, with_speedups
from .types import BACKENDS, PRECISIONS, BenchConfig, BenchProgress, BenchReport, BenchRow

__all__ = ["bench", "check_config", "INT8_BACKENDS"]

INT8_BACKENDS = tuple(INT8_CONVENTIONS)  # backends with an INT8 convention in export's precision transform


def check_config(cfg: BenchConfig) -> None:
    """One-line errors, before any work, for settings the user can fix."""
    if cfg.task not in published.TASK_ROWS:
        raise BadInput(f"unknown --task {cfg.task!r}: choose cls or det")
    if cfg.precision not in PRECISIONS:
        extra = " (int8 rows are in the table by default; --no-int8 turns them off)" if cfg.precision == "int8" else ""
        raise BadInput(f"--precision {cfg.precision} is not measured by bench: choose fp32 or fp16{extra}")
    if cfg.batch < 1:
        raise BadInput(f"--batch must be at least 1, got {cfg.batch}")
    if cfg.iters < 1 or cfg.warmup < 0:
        raise BadInput("--iters must be at least 1 and --warmup at least 0")
    if cfg.rounds < 1:
        raise BadInput(f"--rounds must be at least 1, got {cfg.rounds}")
    if cfg.duration_s is not None and cfg.duration_s < 0:
        raise BadInput(f"--duration must be 0 or more seconds, got {cfg.duration_s}")
    if cfg.threads is not None and cfg.threads < 1:
        raise BadInput(f"--threads must be at least 1, got {cfg.threads}")
    for b in cfg.backends or BACKENDS:
        backend_status(b)  # an unknown name raises, with the closest match


def bench(cfg: BenchConfig, *, progress: BenchProgress | None = None) -> BenchReport:
    """Measure every model x backend of ``cfg`` in interleaved rounds; returns the :class:`BenchReport`.

    Errors the user can fix (unknown model/backend, bad numbers, missing timm for a named baseline)
    raise :class:`~nextvit_deploy.errors.DeployError` before any work starts; a model that fails on one
    backend becomes an entry of ``report.failures`` and the run goes on.
    """
    import torch

    t_start = time.perf_counter()
    progress = progress or BenchProgress()
    check_config(cfg)
    requested = cfg.backends or BACKENDS
    models = resolve_models(cfg)
    warnings: list[str] = []
    if not available("timm"):
        baselines = [m for m in models if not is_nextvit(m)]
        if baselines and cfg.models:
            raise MissingDependency(f"timm is needed for {', '.join(baselines)} but not installed; "
                                    "install with: pip install 'nextvit-deploy[timm]'")
        if baselines:
            warnings.append(f"timm is not installed: skipped {', '.join(baselines)} "
                            "(pip install 'nextvit-deploy[timm]')")
            models = [m for m in models if is_nextvit(m)]
    statuses = tuple(backend_status(b, precision=cfg.precision) for b in BACKENDS)
    run_on = [s for s in statuses if s.name in requested and s.available]
    if not run_on:
        why = "; ".join(f"{s.name}: {s.reason}" for s in statuses if s.name in requested)
        raise BadInput(f"none of the requested backends runs here ({why}): pick from --backends "
                       f"{','.join(s.name for s in statuses if s.available)}")
    threads_before = torch.get_num_threads()
    threads = set_threads(cfg.threads)
    try:
        return _run(cfg, models=models, run_on=run_on, statuses=statuses, threads=threads, warnings=warnings,
                    progress=progress, t_start=t_start)
    finally:
        torch.set_num_threads(threads_before)  # the caller's process keeps its own setting


def _failure(model: str, backend: str, exc: Exception) -> dict[str, str]:
    return {"model": model, "backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _run(cfg: BenchConfig, *, models: list[str], run_on: list[Any], statuses: tuple[Any, ...], threads: int,
         warnings: list[str], progress: BenchProgress, t_start: float) -> BenchReport:
    from ..flops import count_macs

    labels = machine_labels(threads)
    has_trt = any(s.name == "tensorrt" for s in run_on)
    simplify = cfg.simplify if cfg.simplify is not None else has_trt
    labels["flags"] = {"simplify": simplify, "opset": cfg.opset,
                       "onnx_batch": "static" if has_trt else "dynamic (traced at batch 1)",
                       "ort_graph_optimization": "all", "torch_inference_mode": True,
                       "rounds": cfg.rounds, "interleaved": True}
    if any(s.name == "coreml" for s in statuses if s.name in (cfg.backends or BACKENDS)):
        labels["flags"]["coreml_rows"] = coreml_rows().describe()
    needs_onnx = any(s.name in ("onnxruntime", "tensorrt") for s in run_on)
    failures: list[dict[str, str]] = []
    plans: dict[str, list[str]] = {}
    skipped_precisions: list[dict[str, str]] = []
    for status in run_on:
        plans[status.name], skipped = row_precisions(status, cfg, backend_status(status.name, precision="fp16"))
        skipped_precisions.extend(skipped)
    prepared: list[tuple[str, str, Any, Any, Any, Timed, str]] = []  # model, display, status, flops, built, timed,
    # precision
    gemms: list[tuple[int, int, int]] = []
    progress.start(len(models) * (1 + len(run_on)) + len(run_on) + 1)
    progress.step("rows: " + "; ".join(f"{name} {', '.join(p)}" for name, p in plans.items()))
    task, side = cfg.published_task, (cfg.size[0] if cfg.size[0] == cfg.size[1] else 0)
    with tempfile.TemporaryDirectory(prefix="nextvit-bench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        for name in models:
            display = published.display_name(name)
            progress.step(f"{display}: building, counting MACs" + (", exporting ONNX" if needs_onnx else ""))
            try:
                built = build_bench_model(name, task=cfg.task, image_size=cfg.size)
                flops = count_macs(built.module, cfg.size)
                gemms.extend(largest_gemms(built.module, cfg.size, cfg.batch))
                onnx_path = tmp / f"{name}.onnx"
                if needs_onnx:
                    built.notes.extend(export_bench_onnx(built, cfg, onnx_path, simplify=simplify, static=has_trt))
            except DeployError:
                raise
            except Exception as exc:  # noqa: BLE001 - one model failing must not stop the run
                failures.append(_failure(name, "*", exc))
                progress.note(f"{display}: preparation failed: {type(exc).__name__}: {str(exc)[:120]}")
                progress.step(display, advance=1 + len(run_on))
                continue
            progress.step(display, advance=1)
            for status in run_on:
                for precision in plans[status.name]:
                    key = f"{display} on {status.name}" + (f" ({precision})" if precision != cfg.precision else "")
                    progress.step(f"{key}: preparing" + (" (calibrating, quantizing)" if precision == "int8" else ""))
                    row_cfg = dataclasses.replace(cfg, precision=precision, batch=row_batch(status.name, cfg))
                    try:
                        timed = prepare_row(key, built, onnx_path, row_cfg, status, tmp, threads, stack)
                        prepared.append((name, display, status, flops, built, timed, precision))
                    except DeployError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        failures.append(_failure(name, f"{status.name} {precision}", exc))
                        progress.note(f"{key} failed: {type(exc).__name__}: {str(exc)[:120]}")
                progress.step(f"{display} on {status.name}", advance=1)
        gemms = sorted(set(gemms), key=lambda s: -s[0] * s[1] * s[2])[:2]
        peak_items: dict[tuple[str, str], tuple[Any, list[tuple[int, int, int]], list[Timed]]] = {}
        for status in run_on:
            for precision in dict.fromkeys(p[-1] for p in prepared if p[2] is status):
                if status.name not in PEAK_BACKENDS:
                    continue
                shapes = gemm_sweep(status.device.startswith("cuda"), gemms)
                try:
                    items = prepare_peaks(status.name, status, precision, shapes, threads=threads, tmp=tmp,
                                          stack=stack)
                except Exception as exc:  # noqa: BLE001 - a peak that cannot be measured leaves the fraction empty
                    warnings.append(f"GEMM peak of {status.name} {precision} not measured: {type(exc).__name__}: {exc}")
                    items = []
                peak_items[(status.name, precision)] = (status, shapes, items)
            progress.step(f"GEMM peak: {status.name}", advance=1)
        items = [p[5] for p in prepared] + [t for _, _, ts in peak_items.values() for t in ts]  # the Timed of each row
        timings = interleave(items, warmup=cfg.warmup, iters=cfg.iters, rounds=cfg.rounds, duration_s=cfg.duration_s,
                             step=lambda desc, _n: progress.step(desc))
        progress.step("rounds done", advance=1)
        peaks = {key: best_peaks(key[0], status, key[1], shapes, timings)
                 for key, (status, shapes, _) in peak_items.items()}
        rows = []
        for name, display, status, flops, built, timed, precision in prepared:
            timing = timings[timed.key]
            stats = timing.stats
            for w in stats.warnings:
                if w.startswith("noisy"):
                    warnings.append(f"{timed.key}: {w}")
            ms = stats.gpu_median_ms if stats.gpu_median_ms else stats.median_ms
            batch = row_batch(status.name, cfg)
            achieved = 2.0 * flops.macs * batch / (ms * 1e-3) / 1e9
            fraction, peak_note = peak_fraction(achieved, peaks.get((status.name, precision)))
            if peak_note:
                warnings.append(f"{timed.key}: {achieved:.1f} GFLOP/s is above the measured GEMM peak: {peak_note} "
                                "(the sweep missed this backend's best GEMM)")
            pub = published.lookup(name, task=task, image_size=side)
            latency = LatencyReport(name=name, backend=status.name, precision=precision, batch=batch,
                                    input_shape=(batch, 3, *cfg.size), device=status.device or "cpu",
                                    threads=threads, stats=stats, versions={status.name: status.version})
            rows.append(BenchRow(
                model=name, display=display, backend=status.name, latency=latency, gmacs=flops.gmacs,
                params_m=flops.params_m, achieved_gflops=achieved, peak_fraction=fraction, peak_note=peak_note,
                paper_trt_ms=pub.trt_fp16_ms_batch8 if pub else None,
                paper_coreml_ms=pub.coreml_ms_batch1 if pub else None,
                paper_metric=pub.metric_value if pub else None, metric=pub.metric if pub else "",
                paper_status=pub.status if pub else "",
                paper_column="coreml_ms_batch1" if status.name == "coreml" else "trt_fp16_ms_batch8",
                notes=tuple(built.notes) + tuple(timed.notes), round_medians_ms=tuple(timing.round_medians_ms)))
    prepared.clear()
    gc.collect()
    rows = with_speedups(with_ratios(rows, task=task, side=side), "fp32")
    warnings.extend(wide_spreads(rows))
    fewest = min((r.latency.stats.runs for r in rows), default=TARGET_RUNS)
    if fewest < TARGET_RUNS:
        warnings.append(f"some rows rest on {fewest} timed runs (fewer than {TARGET_RUNS}): p99 there is close to "
                        "the slowest run; raise --iters and --duration for tighter percentiles")
    return BenchReport(config=cfg, labels=labels, backends=statuses, peaks=tuple(p for p in peaks.values() if p),
                       rows=tuple(rows), failures=tuple(failures), warnings=tuple(warnings),
                       wall_s=time.perf_counter() - t_start, skipped_precisions=tuple(skipped_precisions))
