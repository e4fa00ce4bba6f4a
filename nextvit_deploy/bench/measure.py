"""Timing through the Runners, in interleaved rounds.

Every row (a model on a backend, an exported artifact, a peak GEMM) becomes a :class:`Timed`: an active
Runner (``runner.infer(feed)``) or, where no Runner applies (a CUDA graph replay, an in-memory Core ML
model), a callable. :func:`interleave` times all of them round by round (A, B, C, A, B, C, ...), each a
share of its runs per round through ``latency.measure``, so drift on a shared machine hits every row alike;
the per-round medians give every ratio its spread.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..latency import LatencyStats, measure
from .types import BenchConfig

__all__ = ["Timed", "Timing", "interleave", "iqr", "prepare_row", "PREPARERS", "coreml_program"]


@dataclass
class Timed:
    """One thing to time: ``target`` is an active Runner (timed on ``feed``) or a callable (timed bare)."""

    key: str
    target: Any
    feed: Any = None
    cuda_events: bool = False
    gpu_ms: Callable[[], float | None] | None = None  # the runner's own device time of the last run (TensorRT)
    notes: tuple[str, ...] = ()  # how the row was built (precision transform, Core ML target), for the report


@dataclass
class Timing:
    """What :func:`interleave` measured for one :class:`Timed`."""

    stats: LatencyStats
    round_medians_ms: list[float] = field(default_factory=list)


def iqr(values: list[float]) -> float | None:
    """Interquartile range (p75 - p25); None for fewer than two values."""
    if len(values) < 2:
        return None
    return float(np.percentile(values, 75) - np.percentile(values, 25))


def interleave(items: list[Timed], *, warmup: int, iters: int, rounds: int, duration_s: float | None,
               step: Callable[[str, int], None] | None = None) -> dict[str, Timing]:
    """Time every item in ``rounds`` rounds; within a round the items run one after the other.

    ``iters`` timed runs per item are split over the rounds; ``duration_s`` (the whole row's budget) is split
    the same way, a round stopping an item early once its share is spent (never below ``latency.MIN_RUNS``
    runs per round or the round's quota when smaller). Warm-up runs happen once, before the first round.
    """
    n_rounds = max(1, min(rounds, iters))
    quotas = [iters // n_rounds + (1 if r < iters % n_rounds else 0) for r in range(n_rounds)]
    budget = None if duration_s is None else duration_s / n_rounds
    samples: dict[str, list[float]] = {t.key: [] for t in items}
    gpu: dict[str, list[float]] = {t.key: [] for t in items}
    medians: dict[str, list[float]] = {t.key: [] for t in items}
    stopped: dict[str, str] = {t.key: "iters" for t in items}
    for item in items:
        if warmup:
            measure(item.target, item.feed, warmup=warmup - 1, iters=1, cuda_events=item.cuda_events)
    for r, quota in enumerate(quotas):
        for item in items:
            runner_gpu: list[float] = []

            def on_run(_i: int, _ms: float, _item: Timed = item, _sink: list[float] = runner_gpu) -> None:
                device_ms = _item.gpu_ms() if _item.gpu_ms is not None else None
                if device_ms is not None:
                    _sink.append(float(device_ms))

            s = measure(item.target, item.feed, warmup=0, iters=quota, min_duration_s=budget,
                        cuda_events=item.cuda_events, on_run=on_run)
            samples[item.key].extend(s.samples_ms)
            gpu[item.key].extend(runner_gpu or ([] if s.gpu_median_ms is None else [s.gpu_median_ms] * s.runs))
            medians[item.key].append(s.median_ms)
            if s.stopped_by == "duration":
                stopped[item.key] = "duration"
            if step is not None:
                step(f"round {r + 1}/{n_rounds}: {item.key} {s.median_ms:.1f} ms", 1)
    return {t.key: Timing(LatencyStats.from_samples(samples[t.key], warmup=warmup, stopped_by=stopped[t.key],
                                                    gpu_samples_ms=gpu[t.key] or None), medians[t.key])
            for t in items}


def round_ratios(row: list[float], ref: list[float]) -> list[float]:
    return [a / b for a, b in zip(row, ref) if b > 0]


def spread_of(row: list[float], ref: list[float]) -> float | None:
    """IQR of the per-round ratios row / ref, relative to their median (0.05 = 5 %)."""
    ratios = round_ratios(row, ref)
    spread = iqr(ratios)
    if spread is None or not ratios:
        return None
    mid = statistics.median(ratios)
    return spread / mid if mid > 0 and math.isfinite(mid) else None


# ---- one preparer per backend: (built model, its ONNX, config, backend, tmp, threads, stack) -> Timed ----
def _feed(cfg: BenchConfig) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((cfg.batch, 3, *cfg.size), dtype=np.float32)


def _torch(key: str, built: Any, onnx_path: Path, cfg: BenchConfig, status: Any, tmp: Path, threads: int,
           stack: ExitStack) -> Timed:
    import torch

    from ..backends.torch import TorchRunner

    device = "cuda" if status.device.startswith("cuda") else "cpu"
    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    runner = TorchRunner(built.module, output_names=built.output_names, image_size=cfg.size, device=device,
                         dtype=dtype, name=f"TorchRunner({key})")
    stack.callback(built.module.to, "cpu", torch.float32)
    stack.enter_context(runner)
    return Timed(key, runner, {"input": _feed(cfg)}, cuda_events=device == "cuda")


def _torch_cudagraph(key: str, built: Any, onnx_path: Path, cfg: BenchConfig, status: Any, tmp: Path,
                     threads: int, stack: ExitStack) -> Timed:
    """A captured CUDA graph has no Runner: its replay is timed (device input, as CUDA graphs require)."""
    import torch

    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    model = built.module.to(device="cuda", dtype=dtype)
    stack.callback(built.module.to, "cpu", torch.float32)
    x = torch.randn(cfg.batch, 3, *cfg.size, device="cuda", dtype=dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up on a side stream before capture, as CUDA graphs require
                model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
    return Timed(key, graph.replay, cuda_events=True)


def _onnxruntime(key: str, built: Any, onnx_path: Path, cfg: BenchConfig, status: Any, tmp: Path, threads: int,
                 stack: ExitStack) -> Timed:
    from ..backends.onnxrt import OrtRunner
    from .models import transformed_onnx

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if status.device.startswith("cuda") \
        else ["CPUExecutionProvider"]
    graph, notes = transformed_onnx(onnx_path, cfg.precision, cfg,
                                    tmp / f"{onnx_path.stem}-{cfg.precision}-ort.onnx", convention="onnxruntime")
    runner = stack.enter_context(OrtRunner(graph, providers=providers, threads=threads))
    return Timed(key, runner, {"input": _feed(cfg)}, notes=tuple(notes))


def _tensorrt(key: str, built: Any, onnx_path: Path, cfg: BenchConfig, status: Any, tmp: Path, threads: int,
              stack: ExitStack) -> Timed:
    """An engine built from the bench ONNX, transformed like ``export --target trt`` does; ``TrtRunner.infer``
    is timed end to end and its CUDA-event time per run (``last_gpu_ms``) becomes the GPU columns."""
    from ..backends.tensorrt import TrtRunner
    from ..backends.trt_build import BuildOptions, build_engine
    from .models import transformed_onnx

    graph, notes = transformed_onnx(onnx_path, cfg.precision, cfg, tmp / f"{onnx_path.stem}-{cfg.precision}-trt.onnx",
                                    convention="tensorrt")
    engine = tmp / f"{onnx_path.stem}-{cfg.precision}.engine"
    build_engine(graph, engine, BuildOptions(precision=cfg.precision, batch=(cfg.batch,) * 3, image_size=cfg.size))
    runner = stack.enter_context(TrtRunner(engine))
    return Timed(key, runner, {"input": _feed(cfg)}, gpu_ms=lambda: runner.last_gpu_ms, notes=tuple(notes))


def coreml_program(module: Any, cfg: BenchConfig) -> Any:
    """``module`` traced at ``cfg.batch`` and converted to an ML Program the way ``export --target coreml`` does
    (its conversion passes, its default minimum deployment target, see :func:`.plan.coreml_rows`); the model
    is loaded for prediction only on macOS (elsewhere coremltools cannot run it)."""
    import sys

    import torch

    from .._deps import import_coremltools
    from ..export.coreml import conversion_pipeline, freeze_traced_shapes, parse_deployment_target
    from .plan import coreml_rows

    ct = import_coremltools(purpose="the Core ML rows")
    x = torch.randn(cfg.batch, 3, *cfg.size)
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), x, check_trace=False)
    freeze_traced_shapes(traced)
    precision = ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32
    return ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(x.shape))], convert_to="mlprogram",
                      compute_precision=precision, pass_pipeline=conversion_pipeline(ct),
                      minimum_deployment_target=parse_deployment_target(coreml_rows().min_target),
                      skip_model_load=sys.platform != "darwin")


def _coreml(key: str, built: Any, onnx_path: Path, cfg: BenchConfig, status: Any, tmp: Path, threads: int,
            stack: ExitStack) -> Timed:
    """Time ``predict`` of :func:`coreml_program` (macOS); ``cfg.batch`` is already the Core ML rows' batch."""
    from .plan import coreml_rows

    mlmodel = coreml_program(built.module, cfg)
    feed = {"input": np.random.default_rng(0).standard_normal((cfg.batch, 3, *cfg.size)).astype(np.float32)}
    return Timed(key, lambda: mlmodel.predict(feed), notes=(f"Core ML rows: {coreml_rows().describe()}",))


PREPARERS: dict[str, Callable[..., Timed]] = {"torch": _torch, "torch-cudagraph": _torch_cudagraph,
                                               "onnxruntime": _onnxruntime, "tensorrt": _tensorrt, "coreml": _coreml}


def prepare_row(key: str, built: Any, onnx_path: Path, cfg: BenchConfig, status: Any, tmp: Path, threads: int,
                stack: ExitStack) -> Timed:
    """The :class:`Timed` of ``built`` on backend ``status.name`` (its runner entered on ``stack``)."""
    return PREPARERS[status.name](key, built, onnx_path, cfg, status, tmp, threads, stack)
