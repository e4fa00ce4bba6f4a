"""Dense GEMM peaks that are peaks: per backend and precision, the best of a small sweep of shapes (square
ones and the model's own largest GEMMs), timed in the same interleaved rounds as the rows.

A row's fraction of its peak is then at most 1 by construction; a row above it means the sweep missed the
backend's best GEMM, and the report says "peak under-measured" instead of printing more than 100 %.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .measure import Timed, Timing
from .types import UNDER_MEASURED, PeakResult

__all__ = ["CPU_SQUARES", "GPU_SQUARES", "PEAK_BACKENDS", "gemm_sweep", "prepare_peaks", "best_peaks",
           "peak_fraction", "UNDER_MEASURED"]

CPU_SQUARES = (512, 1024, 2048)
GPU_SQUARES = (4096, 8192)
PEAK_BACKENDS = ("torch", "torch-cudagraph", "onnxruntime")  # TensorRT / Core ML peaks are not measured here


def gemm_sweep(on_gpu: bool, model_gemms: list[tuple[int, int, int]], *,
               squares: tuple[int, ...] | None = None) -> list[tuple[int, int, int]]:
    """The (M, K, N) shapes timed for a peak: squares (default :data:`CPU_SQUARES` / :data:`GPU_SQUARES`) plus
    the model's largest GEMMs, without repeats."""
    cubes = [(n, n, n) for n in (squares or (GPU_SQUARES if on_gpu else CPU_SQUARES))]
    return list(dict.fromkeys(cubes + list(model_gemms)))


def _gemm_onnx(path: Path, m: int, k: int, n: int, precision: str) -> dict[str, np.ndarray]:
    """``c = a @ b`` with ``b`` a constant (as a model's weights are: ONNX Runtime prepacks it). int8 is the
    u8 x s8 ``QLinearMatMul`` that ONNX Runtime's x86 QDQ graphs run. Returns the feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if precision == "int8":
        b = rng.integers(-64, 64, (k, n), dtype=np.int8)
        inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(0.02, np.float32), "sa"),
                 numpy_helper.from_array(np.array(128, np.uint8), "za"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "sb"),
                 numpy_helper.from_array(np.array(0, np.int8), "zb"),
                 numpy_helper.from_array(np.array(0.5, np.float32), "sc"),
                 numpy_helper.from_array(np.array(128, np.uint8), "zc")]
        node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"])
        et = TensorProto.UINT8
        feed = {"a": rng.integers(0, 255, (m, k), dtype=np.uint8)}
    else:
        dt = np.float16 if precision == "fp16" else np.float32
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(dt), "b")]
        node = helper.make_node("MatMul", ["a", "b"], ["c"])
        et = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        feed = {"a": rng.standard_normal((m, k)).astype(dt)}
    graph = helper.make_graph([node], "gemm_peak", [helper.make_tensor_value_info("a", et, [m, k])],
                              [helper.make_tensor_value_info("c", et, [m, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.save(model, str(path))
    return feed


def _peak_key(backend: str, precision: str, shape: tuple[int, int, int]) -> str:
    return f"peak {backend} {precision} {'x'.join(map(str, shape))}"


def prepare_peaks(backend: str, status: Any, precision: str, shapes: list[tuple[int, int, int]], *, threads: int,
                  tmp: Path, stack: ExitStack) -> list[Timed]:
    """One :class:`Timed` per GEMM shape of ``backend`` in ``precision`` (empty where not measured here)."""
    on_gpu = status.device.startswith("cuda")
    items: list[Timed] = []
    if backend in ("torch", "torch-cudagraph") and precision in ("fp32", "fp16"):
        import torch

        device = "cuda" if on_gpu else "cpu"
        dtype = torch.float16 if precision == "fp16" else torch.float32
        for m, k, n in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            items.append(Timed(_peak_key(backend, precision, (m, k, n)),
                               lambda a=a, b=b: torch.matmul(a, b), cuda_events=on_gpu))
    elif backend == "onnxruntime":
        from ..backends.onnxrt import OrtRunner

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
        for m, k, n in shapes:
            path = tmp / f"gemm-{m}x{k}x{n}-{precision}.onnx"
            feed = _gemm_onnx(path, m, k, n, precision)
            runner = stack.enter_context(OrtRunner(path, providers=providers, threads=threads))
            items.append(Timed(_peak_key(backend, precision, (m, k, n)), runner, feed))
    return items


def best_peaks(backend: str, status: Any, precision: str, shapes: list[tuple[int, int, int]],
               timings: dict[str, Timing]) -> PeakResult | None:
    """The best shape's GFLOP/s (from its fastest run: a peak must not be lowered by a busy moment)."""
    sweep = []
    for shape in shapes:
        t = timings.get(_peak_key(backend, precision, shape))
        if t is not None:
            m, k, n = shape
            ms = t.stats.gpu_median_ms if t.stats.gpu_median_ms else t.stats.min_ms
            sweep.append((shape, 2.0 * m * k * n / (ms * 1e-3) / 1e9, t))
    if not sweep:
        return None
    shape, gflops, best = max(sweep, key=lambda s: s[1])
    return PeakResult(backend, precision, status.device or "cpu", max(shape), gflops, best.stats, shape=shape,
                      sweep=tuple((s, g) for s, g, _ in sweep))


def peak_fraction(achieved_gflops: float | None, peak: PeakResult | None) -> tuple[float | None, str]:
    """(fraction of the peak, note): never above 1; a row above its peak gets :data:`UNDER_MEASURED`."""
    if achieved_gflops is None or peak is None or peak.gflops <= 0:
        return None, ""
    fraction = achieved_gflops / peak.gflops
    if fraction > 1.0:
        return None, UNDER_MEASURED
    return fraction, ""
