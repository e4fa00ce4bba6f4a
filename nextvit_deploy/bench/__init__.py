"""The latency harness behind ``nextvit-deploy bench``: the paper's speed table reproduced as ratios, and
exported artifacts timed side by side.

Absolute milliseconds belong to a machine (the paper used TensorRT 8.0.3 FP16 on a T4 and CoreML on an
iPhone), so every row is also expressed relative to ResNet-101 and to Next-ViT-S *measured in the same
run on the same backend*, next to the same ratios computed from the published numbers, with a flag where
the ordering differs from the paper. Rows are timed through the Runners in interleaved rounds (A, B, C,
A, B, C, ...), so drift hits all rows alike and every ratio carries its spread; every row's achieved
GFLOP/s is a fraction of the best GEMM of a sweep measured in the same rounds (never above 100 %).

The default table has precision rows per backend: fp32 (the base of every speed-up), fp16 where the backend
runs it natively (GPU backends, Core ML), int8 in the backend's convention (ONNX Runtime x86 QDQ on the CPU,
TensorRT Q/DQ; ``--no-int8`` turns them off); a precision not run says why. Core ML rows run at batch 1 and
the export's deployment target, as the paper's Core ML column.

Modules: ``types`` (config and results), ``machine`` (labels, CPU flags, backend availability), ``plan``
(precisions per backend, Core ML rows' configuration), ``models`` (model resolution, deploy forms, ONNX,
precision transforms), ``measure`` (Runners, interleaved rounds), ``peaks``, ``ratios``, ``run`` (the default
table), ``artifacts`` (``bench ARTIFACT...``), ``precision_table`` and ``render`` (every output file).
"""
from __future__ import annotations

from .artifacts import bench_artifacts
from .machine import backend_status, cpu_flags, int8_weight_bits, machine_labels
from .models import build_bench_model, resolve_models, trt_ready_onnx
from .ratios import ordering_flag
from .ratios import with_ratios as _with_ratios
from .render import labels_line, plot_accuracy_latency, render_csv, render_markdown, write_outputs
from .run import bench
from .types import (
    BACKENDS,
    REFERENCE_MODELS,
    TIE_BAND,
    BackendStatus,
    BenchConfig,
    BenchProgress,
    BenchReport,
    BenchRow,
    PeakResult,
)

__all__ = ["BACKENDS", "BenchConfig", "BackendStatus", "PeakResult", "BenchRow", "BenchReport", "BenchProgress",
           "bench", "bench_artifacts", "backend_status", "resolve_models", "ordering_flag", "render_markdown",
           "render_csv", "write_outputs", "plot_accuracy_latency", "labels_line", "build_bench_model",
           "trt_ready_onnx", "machine_labels", "cpu_flags", "int8_weight_bits", "REFERENCE_MODELS", "TIE_BAND",
           "_with_ratios"]
