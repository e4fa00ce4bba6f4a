"""``nextvit-deploy bench ARTIFACT...``: time what ``export`` wrote, with the runner its target uses.

ONNX Runtime runs ``.onnx`` and TensorRT-ready ``.onnx`` files, TensorRT ``.engine`` files, Core ML (or
the MIL evaluator off macOS) ``.mlpackage`` packages, all opened by ``targets.runner_for``. Every artifact
and every peak GEMM is timed in the same interleaved rounds; ratios are against the first artifact (or
``baseline``), each with the interquartile range of its per-round ratios.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import Availability
from ..errors import BadInput
from ..latency import TARGET_RUNS, LatencyReport, set_threads
from .machine import machine_labels
from .measure import Timed, interleave
from .peaks import PEAK_BACKENDS, best_peaks, gemm_sweep, peak_fraction, prepare_peaks
from .ratios import wide_spreads, with_baseline
from .types import BenchConfig, BenchProgress, BenchReport, BenchRow

__all__ = ["bench_artifacts", "artifact_backend", "peak_precision"]


def artifact_backend(artifact: Any, runner: Any) -> str:
    """The bench backend name of the runner ``targets.runner_for`` opened for ``artifact``."""
    name = type(runner).__name__
    return {"OrtRunner": "onnxruntime", "TrtRunner": "tensorrt", "CoreMLRunner": "coreml",
            "MilRunner": "coreml-mil"}.get(name, name)


def peak_precision(precision: str) -> str:
    """The GEMM an artifact's rows compare with: int8 rows with the int8 GEMM, fp16 and fp32 with their own."""
    return precision if precision in ("fp32", "fp16", "int8") else "fp32"


@dataclass
class _Prepared:
    display: str
    artifact: Any
    backend: str
    device: str
    timed: Timed
    macs: float | None
    gemms: list[tuple[int, int, int]]


def _feed(runner: Any, batch: int, default_batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for spec in runner.inputs():
        shape = [d if d is not None else (batch or default_batch) for d in spec.shape]
        if spec.shape and spec.shape[0] is not None and batch and batch != spec.shape[0]:
            raise BadInput(f"{runner.name} has a static batch of {spec.shape[0]}: drop --batch or re-export with "
                           f"--batch {batch}")
        feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


def _complexity(artifact: Any, batch: int, cache: dict[tuple[Any, ...], Any]) -> tuple[float | None,
                                                                                    list[tuple[int, int, int]]]:
    """MACs per image and the largest GEMMs of the model the artifact came from (untrained weights: only
    shapes count), counted once per distinct architecture and input."""
    from nextvit_model import create_model

    from ..flops import count_macs
    from .models import largest_gemms

    size = tuple(artifact.input_shape[2:])
    key = (artifact.variant, artifact.depths, artifact.features_only, artifact.num_classes, size, batch)
    if key not in cache:
        model = create_model(artifact.variant, features_only=artifact.features_only, depths=artifact.depths,
                             num_classes=artifact.num_classes).eval()
        cache[key] = (float(count_macs(model, size).macs), largest_gemms(model, size, batch))
    return cache[key]


def bench_artifacts(paths: Sequence[str | Path], *, baseline: str | Path | None = None, batch: int | None = None,
                    warmup: int = 1, iters: int = 20, rounds: int = 5, duration_s: float | None = 5.0,
                    threads: int | None = None, progress: BenchProgress | None = None,
                    peak_squares: tuple[int, ...] | None = None) -> BenchReport:
    """Time the exported artifacts at ``paths`` in interleaved rounds; ratios against ``baseline`` (a path
    among ``paths`` or its file name; defaults to the first). ``peak_squares``: sides of the square GEMMs of
    the peak sweep (beside the model's own largest GEMMs); defaults to ``peaks.CPU_SQUARES`` / ``GPU_SQUARES``."""
    from ..artifact import Artifact
    from ..targets import runner_for

    t_start = time.perf_counter()
    progress = progress or BenchProgress()
    if not paths:
        raise BadInput("name at least one exported artifact, e.g. nextvit-deploy bench build/*.onnx")
    files = [Path(p) for p in paths]
    for f in files:
        if not f.exists():
            raise BadInput(f"{f} does not exist: pass files that `nextvit-deploy export` wrote")
    displays = [f.name for f in files]
    if len(set(displays)) < len(displays):
        displays = [str(f) for f in files]
    base = displays[0]
    if baseline is not None:
        matches = [d for d, f in zip(displays, files) if str(baseline) in (d, str(f), f.name)]
        if not matches:
            raise BadInput(f"--baseline {baseline} is not among the artifacts: name one of {', '.join(displays)}")
        base = matches[0]
    if rounds < 1 or iters < 1 or warmup < 0:
        raise BadInput("--rounds and --iters must be at least 1 and --warmup at least 0")
    artifacts = [Artifact.load(f) for f in files]  # one-line ArtifactError on a file without a valid manifest
    threads_used = set_threads(threads)
    labels = machine_labels(threads_used)
    labels["flags"] = {"rounds": rounds, "interleaved": True, "ort_graph_optimization": "all"}
    warnings: list[str] = []
    progress.start(len(artifacts) + 2)
    with ExitStack() as stack:
        import tempfile

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nextvit-bench-")))
        prepared = []
        counted: dict[tuple[Any, ...], Any] = {}
        for display, art in zip(displays, artifacts):
            progress.step(f"{display}: opening")
            runner = stack.enter_context(runner_for(art, threads=threads_used))
            feed = _feed(runner, batch or 0, art.batch[1])
            macs, gemms = _complexity(art, next(iter(feed.values())).shape[0], counted)
            prepared.append(_Prepared(display, art, artifact_backend(art, runner), runner.device,
                                      Timed(display, runner, feed), macs, gemms))
            progress.step(display, advance=1)
        peak_sets: dict[tuple[str, str], tuple[Availability, list[tuple[int, int, int]], list[Timed]]] = {}
        for p in prepared:
            key = (p.backend, peak_precision(p.artifact.precision))
            if p.backend in PEAK_BACKENDS and key not in peak_sets:
                status = Availability(p.backend, True, device=p.device)
                gemms = sorted({g for q in prepared for g in q.gemms}, key=lambda s: -s[0] * s[1] * s[2])[:2]
                shapes = gemm_sweep(p.device.startswith("cuda"), gemms, squares=peak_squares)
                try:
                    items = prepare_peaks(p.backend, status, key[1], shapes, threads=threads_used, tmp=tmp, stack=stack)
                except Exception as exc:  # noqa: BLE001 - no peak: the fraction stays empty
                    warnings.append(f"GEMM peak of {p.backend} {key[1]} not measured: {type(exc).__name__}: {exc}")
                    items = []
                peak_sets[key] = (status, shapes, items)
        items = [p.timed for p in prepared] + [t for _, _, ts in peak_sets.values() for t in ts]
        timings = interleave(items, warmup=warmup, iters=iters, rounds=rounds, duration_s=duration_s,
                             step=lambda desc, _n: progress.step(desc))
        progress.step("rounds done", advance=1)
    peaks = {k: best_peaks(k[0], s, k[1], shapes, timings) for k, (s, shapes, _) in peak_sets.items()}
    rows = []
    for p in prepared:
        timing = timings[p.timed.key]
        stats = timing.stats
        n = next(iter(p.timed.feed.values())).shape[0]
        ms = stats.gpu_median_ms if stats.gpu_median_ms else stats.median_ms
        achieved = 2.0 * p.macs * n / (ms * 1e-3) / 1e9 if p.macs else None
        fraction, note = peak_fraction(achieved, peaks.get((p.backend, peak_precision(p.artifact.precision))))
        if note:
            warnings.append(f"{p.display}: {achieved:.1f} GFLOP/s is above the measured GEMM peak: {note}")
        latency = LatencyReport(name=p.display, backend=p.backend, precision=p.artifact.precision, batch=n,
                                input_shape=(n, *p.artifact.input_shape[1:]), device=p.device, threads=threads_used,
                                stats=stats, versions=dict(p.artifact.versions))
        rows.append(BenchRow(model=p.display, display=p.display, backend=p.backend, latency=latency,
                             gmacs=(p.macs or 0.0) / 1e9, params_m=0.0, achieved_gflops=achieved or 0.0,
                             peak_fraction=fraction, peak_note=note, paper_trt_ms=None, paper_coreml_ms=None,
                             paper_metric=None, metric="", paper_status="", paper_column="",
                             notes=(f"target {p.artifact.target}",),
                             round_medians_ms=tuple(timing.round_medians_ms)))
    rows = with_baseline(rows, base)
    warnings.extend(wide_spreads(rows))
    if min(r.latency.stats.runs for r in rows) < TARGET_RUNS:
        warnings.append(f"some rows rest on fewer than {TARGET_RUNS} timed runs: raise --iters and --duration")
    first = artifacts[0]
    height, width = (int(d) for d in first.input_shape[2:4])
    cfg = BenchConfig(models=tuple(displays), batch=rows[0].latency.batch, precision=first.precision,
                      image_size=(height, width), warmup=warmup, iters=iters, duration_s=duration_s,
                      threads=threads, rounds=rounds)
    return BenchReport(config=cfg, labels=labels, backends=(), peaks=tuple(p for p in peaks.values() if p),
                       rows=tuple(rows), warnings=tuple(warnings), wall_s=time.perf_counter() - t_start,
                       artifacts=True)
