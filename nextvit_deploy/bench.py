"""The latency harness behind ``nextvit-deploy bench``: the paper's speed table, reproduced as ratios.

Absolute milliseconds belong to a machine (the paper used TensorRT 8.0.3 FP16 on a T4 and CoreML on an
iPhone), so every row is also expressed relative to ResNet-101 and to Next-ViT-S *measured in the same
run on the same backend*, next to the same ratios computed from the published numbers, with a flag where
the ordering differs from the paper. Each model goes through one pipeline: deploy form (Next-ViT through
``fuse_model``; timm baselines with Conv->BN folded by ``torch.fx`` for the torch rows and by the ONNX
exporter in eval mode), the same ONNX export (``export.onnx.to_onnx``; static batch when TensorRT runs) and the same
runtime settings (threads pinned, warm-up discarded, see ``latency.measure``). Every row also gets its
achieved GFLOP/s (from ``flops.count_macs``) and the fraction of the dense MatMul peak of the same
backend measured in the same run, in the same precision on the same device.

Backends: ``torch`` (eager), ``torch-cudagraph`` (GPU only), ``onnxruntime``, ``tensorrt`` (through
``nextvit_deploy.backends.tensorrt`` when importable) and ``coreml`` (macOS only). Backends this machine
lacks are listed with the reason and skipped.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import gc
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import published
from ._deps import available, require
from .errors import BadInput, DeployError, MissingDependency
from .latency import TARGET_RUNS, LatencyReport, LatencyStats, measure, set_threads

__all__ = ["BACKENDS", "BenchConfig", "BackendStatus", "PeakResult", "BenchRow", "BenchReport", "BenchProgress",
           "bench", "backend_status", "resolve_models", "ordering_flag", "render_markdown", "write_outputs",
           "plot_accuracy_latency", "REFERENCE_MODELS", "TIE_BAND"]

BACKENDS: tuple[str, ...] = ("torch", "torch-cudagraph", "onnxruntime", "tensorrt", "coreml")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
REFERENCE_MODELS = {"resnet101": "ResNet-101", "nextvit_small": "Next-ViT-S"}
TIE_BAND = 0.05  # a published ratio within 5 % of 1.0 is a near tie: an ordering flip there is marked "flip~"
CPU_MATMUL_N = 2048  # side of the square MatMul that measures a backend's dense peak (CPU)
GPU_MATMUL_N = 8192


# --------------------------------------------------------------------------------------------------
# Configuration and results (frozen values; the table, JSON, CSV and Markdown all come from them).
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``None`` fields take the task's defaults.

    Attributes:
        models: timm names (or the paper's names) to run. Defaults to the task's subset, or every row
            of the published table that timm can build with ``full``.
        backends: subset of :data:`BACKENDS`. Defaults to every backend this machine has.
        batch: images per call. Defaults to 8 (the paper's TensorRT protocol).
        precision: ``fp32`` or ``fp16``. Defaults to fp32.
        image_size: (height, width). Defaults to 224 for ``cls`` and 512 for ``det``.
        warmup: discarded runs per row. Defaults to 1.
        iters: timed runs wanted per row. Defaults to 20.
        duration_s: seconds of timed runs after which a row may stop before ``iters`` (at least 3 runs).
            Defaults to 5 s; None means exactly ``iters`` runs.
        threads: intra-op threads for every backend. Defaults to all cores.
        task: ``cls`` (classifier at 224) or ``det`` (backbone feature maps at 512, the det/seg rows).
        full: every published row with a ``timm_name`` instead of the default subset.
        simplify: run the ONNX simplifier. Defaults to only when TensorRT runs (ONNX Runtime's own
            graph optimiser folds the same constants at session creation).
        opset: ONNX opset. Defaults to 17.
    """

    models: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    batch: int = 8
    precision: str = "fp32"
    image_size: tuple[int, int] | None = None
    warmup: int = 1
    iters: int = 20
    duration_s: float | None = 5.0
    threads: int | None = None
    task: str = "cls"
    full: bool = False
    simplify: bool | None = None
    opset: int = 17

    @property
    def size(self) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size
        side = published.TASK_ROWS[self.task][1]
        return side, side

    @property
    def published_task(self) -> str:
        return published.TASK_ROWS[self.task][0]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.size)
        return d


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend runs here; ``reason`` says why not, ``version`` what runs."""

    name: str
    available: bool
    reason: str = ""
    version: str = ""
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PeakResult:
    """Dense MatMul throughput of one backend: an ``n x n`` by ``n x n`` product in ``precision``."""

    backend: str
    precision: str
    device: str
    n: int
    gflops: float
    stats: LatencyStats

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "device": self.device, "n": self.n,
                "gflops": round(self.gflops, 3), "stats": self.stats.to_dict()}


@dataclass(frozen=True)
class BenchRow:
    """One model on one backend, with complexity, published numbers and ratios.

    Latencies are milliseconds per batch. ``ratio_*`` are this row's median over the reference model's
    median on the same backend in the same run; ``paper_ratio_*`` the same from the published column
    ``paper_column``; ``flag_*`` is ``""`` (same ordering), ``"flip"`` or ``"flip~"`` (flip against a
    near tie in the paper, within :data:`TIE_BAND`), None when a side is missing.
    """

    model: str
    display: str
    backend: str
    latency: LatencyReport
    gmacs: float
    params_m: float
    achieved_gflops: float
    peak_fraction: float | None
    paper_trt_ms: float | None
    paper_coreml_ms: float | None
    paper_metric: float | None
    metric: str
    paper_status: str
    paper_column: str
    ratio_resnet101: float | None = None
    paper_ratio_resnet101: float | None = None
    flag_resnet101: str | None = None
    ratio_nextvit_s: float | None = None
    paper_ratio_nextvit_s: float | None = None
    flag_nextvit_s: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def median_ms(self) -> float:
        return self.latency.median_ms

    @property
    def throughput_ips(self) -> float:
        return self.latency.throughput_ips

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "model", "display", "backend", "gmacs", "params_m", "achieved_gflops", "peak_fraction",
            "paper_trt_ms", "paper_coreml_ms", "paper_metric", "metric", "paper_status", "paper_column",
            "ratio_resnet101", "paper_ratio_resnet101", "flag_resnet101", "ratio_nextvit_s",
            "paper_ratio_nextvit_s", "flag_nextvit_s")}
        s = self.latency.stats
        d.update(precision=self.latency.precision, batch=self.latency.batch, device=self.latency.device,
                 threads=self.latency.threads, input_shape=list(self.latency.input_shape),
                 median_ms=s.median_ms, p90_ms=s.p90_ms, p99_ms=s.p99_ms, throughput_ips=self.throughput_ips,
                 gpu_median_ms=s.gpu_median_ms, runs=s.runs, spread=round(s.spread, 4), noisy=s.noisy,
                 notes=list(self.notes), latency=self.latency.to_dict())
        for k, v in list(d.items()):
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d


@dataclass(frozen=True)
class BenchReport:
    """A whole bench run. ``bool(report)`` is True when every requested row was measured."""

    config: BenchConfig
    labels: dict[str, Any]
    backends: tuple[BackendStatus, ...]
    peaks: tuple[PeakResult, ...]
    rows: tuple[BenchRow, ...]
    failures: tuple[dict[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    wall_s: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.rows) and not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "nextvit-deploy-bench/1", "config": self.config.to_dict(), "labels": self.labels,
                "backends": [b.to_dict() for b in self.backends], "peaks": [p.to_dict() for p in self.peaks],
                "rows": [r.to_dict() for r in self.rows], "failures": list(self.failures),
                "warnings": list(self.warnings), "wall_s": round(self.wall_s, 2),
                "published_protocol": published.PUBLISHED_PROTOCOL}


class BenchProgress:
    """Progress callbacks (no-ops here; the CLI draws a rich progress bar)."""

    def start(self, total: int) -> None:
        """The run will take ``total`` steps (model preparations + rows)."""

    def step(self, description: str, advance: int = 0) -> None:
        """Show ``description``; advance the bar by ``advance`` steps."""

    def note(self, message: str) -> None:
        """A warning or remark worth showing while the run continues."""


# --------------------------------------------------------------------------------------------------
# Machine labels, backends, models.
# --------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_labels(threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, OS, GPU, versions, threads."""
    import torch

    from .artifact import tool_versions

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": platform.node(), "cpu": _cpu_name(), "cores": os.cpu_count(), "os": platform.platform(),
        "python": platform.python_version(), "gpu": gpu, "threads": threads,
        "versions": tool_versions("timm", "onnxsim", "tensorrt", "coremltools", "numpy"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]) if sys.argv else "",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def backend_status(name: str, *, precision: str = "fp32") -> BackendStatus:
    """Whether backend ``name`` can run on this machine in ``precision``, and if not, why."""
    import torch

    cuda = torch.cuda.is_available()
    if name == "torch":
        device = f"cuda:0 ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
        if precision == "fp16" and not cuda:
            return BackendStatus(name, False, "fp16 on a CPU is emulated, not a deployment setting: "
                                 "use --precision fp32", torch.__version__, device)
        return BackendStatus(name, True, "", torch.__version__, device)
    if name == "torch-cudagraph":
        if not cuda:
            return BackendStatus(name, False, "needs a CUDA GPU (this machine has none)", torch.__version__)
        return BackendStatus(name, True, "", torch.__version__, f"cuda:0 ({torch.cuda.get_device_name(0)})")
    if name == "onnxruntime":
        if not available("onnxruntime"):
            return BackendStatus(name, False, "onnxruntime is not installed: pip install onnxruntime")
        import onnxruntime as ort

        gpu = "CUDAExecutionProvider" in ort.get_available_providers() and cuda
        if precision == "fp16":
            return BackendStatus(name, False, "fp16 ONNX Runtime rows are not measured by bench: "
                                 "use --precision fp32 (or export --precision fp16 and time it yourself)",
                                 ort.__version__)
        return BackendStatus(name, True, "", ort.__version__, "cuda:0 (CUDA EP)" if gpu else "cpu")
    if name == "tensorrt":
        if not available("tensorrt"):
            return BackendStatus(name, False, "tensorrt is not installed (needs an NVIDIA GPU): "
                                 "pip install 'nextvit-deploy[trt]'")
        if not cuda:
            return BackendStatus(name, False, "TensorRT needs a CUDA GPU (this machine has none)")
        try:
            import importlib

            importlib.import_module("nextvit_deploy.backends.tensorrt")
        except ImportError as exc:
            return BackendStatus(name, False, f"nextvit_deploy.backends.tensorrt cannot be imported ({exc})")
        from importlib import metadata

        return BackendStatus(name, True, "", metadata.version("tensorrt"), f"cuda:0 ({torch.cuda.get_device_name(0)})")
    if name == "coreml":
        if sys.platform != "darwin":
            return BackendStatus(name, False, f"the Core ML runtime is macOS-only (this is {sys.platform}); "
                                 "export --target coreml here and bench on a Mac")
        if not available("coremltools"):
            return BackendStatus(name, False, "coremltools is not installed: pip install 'nextvit-deploy[coreml]'")
        from importlib import metadata

        return BackendStatus(name, True, "", metadata.version("coremltools"), "Core ML (compute units ALL)")
    raise BadInput(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")


def _is_nextvit(name: str) -> bool:
    return name.startswith("nextvit_")


def resolve_models(cfg: BenchConfig) -> list[str]:
    """The timm names to run, validated (one-line errors that name the fix)."""
    task, side = cfg.published_task, cfg.size[0]
    rows = published.rows_for(task, side) if cfg.size[0] == cfg.size[1] else []
    if cfg.models:
        names = []
        known = {r.timm_name for r in published.published_rows() if r.timm_name}
        by_display = {r.model.lower(): r for r in published.published_rows()}
        for raw in cfg.models:
            key = raw.strip()
            if not key:
                continue
            row = by_display.get(key.lower())
            if row is not None and not row.timm_name:
                raise BadInput(f"{row.model} is not in timm ({row.note}): pick another model or drop it from --models")
            name = row.timm_name if row is not None else key
            if name in ("s", "b", "l", "small", "base", "large"):
                from nextvit_model import resolve_variant

                name = resolve_variant(name).name
            if name not in known and not _is_nextvit(name):
                if available("timm"):
                    import timm

                    if timm.is_model(name):
                        names.append(name)
                        continue
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BadInput(f"unknown model {raw!r}{hint}: use a timm name from the published table, "
                               f"e.g. {', '.join(published.DEFAULT_MODELS['cls'])}")
            if _is_nextvit(name) and name not in ("nextvit_small", "nextvit_base", "nextvit_large"):
                raise BadInput(f"unknown Next-ViT variant {raw!r}: use nextvit_small, nextvit_base or nextvit_large")
            if name not in names:
                names.append(name)
        if not names:
            raise BadInput("--models is empty: name at least one model, e.g. --models nextvit_small,resnet101")
        return names
    if cfg.full:
        names = list(dict.fromkeys(r.timm_name for r in rows))
        if not names:
            raise BadInput(f"no published {task} rows at {cfg.size[0]}x{cfg.size[1]}: use --image-size "
                           f"{published.TASK_ROWS[cfg.task][1]} with --full, or name --models")
        return names
    return list(published.DEFAULT_MODELS[cfg.task])


@dataclass
class _Built:
    module: Any  # torch module in eval mode (deploy form where possible)
    export_module: Any  # what goes to ONNX
    output_names: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def _fold_conv_bn(model, notes: list[str]):
    """Fold Conv->BN pairs of a timm model with torch.fx; keep the model as it is when tracing fails."""
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(model)
    except Exception as exc:  # fx cannot trace every timm model: fall back to the unfused eval model
        notes.append(f"torch rows: BatchNorms not folded (torch.fx: {type(exc).__name__})")
        return model
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    notes.append(f"torch rows: {before - left} Conv->BN pairs folded by torch.fx")
    if left:
        notes.append(f"torch rows: {left} BatchNorms without a preceding conv stay")
    return fused.eval()


def build_bench_model(name: str, *, task: str, image_size: tuple[int, int]) -> _Built:
    """The deploy form of ``name`` for ``task`` (``cls``: logits; ``det``: backbone feature maps)."""
    import torch

    if _is_nextvit(name):
        from nextvit_model import create_model

        from .fuse import fuse_model

        with torch.no_grad():
            model = create_model(name, features_only=task == "det")
            fused = fuse_model(model, inplace=True)
        names = ("feat_s4", "feat_s8", "feat_s16", "feat_s32") if task == "det" else ("logits",)
        notes = [f"{fused.folded} BatchNorms folded by fuse_model"]
        return _Built(fused.model.eval(), fused.model.eval(), names, notes)
    timm = require("timm", purpose=f"the {name} baseline of the latency table")
    notes: list[str] = []
    if task == "det":
        try:
            model = timm.create_model(name, pretrained=False, features_only=True).eval()
        except Exception as exc:  # some timm models have no feature extraction: use the trunk without head
            notes.append(f"features_only unsupported ({type(exc).__name__}): trunk without pooling/head")
            model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *image_size))
        count = 1 if isinstance(out, torch.Tensor) else len(out)
        names = tuple(f"feat_{i}" for i in range(count))
    else:
        model = timm.create_model(name, pretrained=False).eval()
        names = ("logits",)
    torch_model = _fold_conv_bn(model, notes)
    return _Built(torch_model, model, names, notes)


# --------------------------------------------------------------------------------------------------
# Per-backend measurement.
# --------------------------------------------------------------------------------------------------
def _torch_device(status: BackendStatus) -> str:
    return "cuda" if status.device.startswith("cuda") else "cpu"


def _measure_torch(built: _Built, cfg: BenchConfig, status: BackendStatus, *, graphs: bool,
                   on_run: Callable[[int, float], None]) -> LatencyStats:
    import torch

    device = "cuda" if graphs else _torch_device(status)
    dtype = torch.float16 if cfg.precision == "fp16" else torch.float32
    model = built.module.to(device=device, dtype=dtype)
    x = torch.randn(cfg.batch, 3, *cfg.size, device=device, dtype=dtype)
    on_gpu = device == "cuda"
    try:
        if not graphs:
            def run() -> Any:
                with torch.inference_mode():
                    return model(x)

            return measure(run, warmup=cfg.warmup, iters=cfg.iters, min_duration_s=cfg.duration_s,
                           cuda_events=on_gpu, on_run=on_run)
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
        return measure(graph.replay, warmup=cfg.warmup, iters=cfg.iters, min_duration_s=cfg.duration_s,
                       cuda_events=True, on_run=on_run)
    finally:
        built.module.to("cpu", torch.float32)
        if on_gpu:
            torch.cuda.empty_cache()


def _export_onnx(built: _Built, cfg: BenchConfig, path: Path, *, simplify: bool, static: bool) -> list[str]:
    """ONNX of the deploy form; returns notes (BatchNorm nodes left, simplifier).

    ``static``: batch fixed at ``cfg.batch`` (what TensorRT gets, as in the paper). Otherwise the graph
    is traced at batch 1 with a dynamic batch axis, which costs an eighth of a batch-8 trace; ONNX
    Runtime on a CPU plans the same kernels either way.
    """
    import onnx

    from .export.onnx import graph_facts, simplify_onnx, to_onnx

    trace_batch = cfg.batch if static else 1
    to_onnx(built.export_module, path, image_size=cfg.size, batch=trace_batch, dynamic_batch=not static,
            opset=cfg.opset, output_names=built.output_names)
    proto = onnx.load(str(path))
    notes = []
    if simplify:
        rng = np.random.default_rng(0)
        feed = rng.standard_normal((trace_batch, 3, *cfg.size), dtype=np.float32)
        proto, tool, simp_notes = simplify_onnx(proto, check_feeds=[feed])
        onnx.save(proto, str(path))
        notes.append(f"simplifier: {tool}")
    facts = graph_facts(proto)
    if facts["batchnorm_nodes"]:
        notes.append(f"onnx: {facts['batchnorm_nodes']} BatchNormalization nodes left")
    return notes


def _measure_ort(onnx_path: Path, cfg: BenchConfig, status: BackendStatus, threads: int,
                 on_run: Callable[[int, float], None]) -> LatencyStats:
    from .backends.onnxrt import OrtRunner

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if status.device.startswith("cuda") \
        else ["CPUExecutionProvider"]
    feed = {"input": np.random.default_rng(0).standard_normal((cfg.batch, 3, *cfg.size), dtype=np.float32)}
    with OrtRunner(onnx_path, providers=providers, threads=threads) as runner:
        return measure(runner, feed, warmup=cfg.warmup, iters=cfg.iters, min_duration_s=cfg.duration_s,
                       on_run=on_run)


TRT_CALIBRATION_IMAGES = 16  # fp16 rows: images that measure activation ranges (the export default is 64)


def trt_ready_onnx(onnx_path: Path, precision: str, cfg: BenchConfig, out: Path) -> Path:
    """The graph a TensorRT row builds, through the same precision transform as ``export --target trt``
    (a strongly typed build takes its precision from the graph): fp32 as exported, fp16 the mixed-precision
    graph calibrated on the bundled calibration photos."""
    if precision == "fp32":
        return onnx_path
    import onnx

    from nextvit_model import IMAGENET_MEAN, IMAGENET_STD

    from .data import calibration_photos, normalize
    from .export.transform import transform_graph

    calib = normalize(calibration_photos(TRT_CALIBRATION_IMAGES, cfg.size), IMAGENET_MEAN, IMAGENET_STD)
    model, _ = transform_graph(onnx.load(str(onnx_path)), precision, calib, convention="tensorrt")
    onnx.save(model, str(out))
    return out


def _measure_tensorrt(onnx_path: Path, name: str, built: _Built, cfg: BenchConfig, tmp: Path,
                      on_run: Callable[[int, float], None]) -> LatencyStats:
    """Build an engine from the bench ONNX, transformed to ``cfg.precision`` like ``export --target trt``
    does, with ``nextvit_deploy.backends.tensorrt.build_engine`` and time ``TrtRunner.infer`` (end to end,
    host copies included); its CUDA-event time per run (``last_gpu_ms``) becomes the GPU columns. Not run
    on a machine without TensorRT."""
    from .backends.tensorrt import TrtRunner
    from .backends.trt_build import BuildOptions, build_engine

    graph = trt_ready_onnx(onnx_path, cfg.precision, cfg, tmp / f"{name}-{cfg.precision}.onnx")
    engine = tmp / f"{name}-{cfg.precision}.engine"
    build_engine(graph, engine, BuildOptions(precision=cfg.precision, batch=(cfg.batch,) * 3, image_size=cfg.size))
    feed = {"input": np.random.default_rng(0).standard_normal((cfg.batch, 3, *cfg.size), dtype=np.float32)}
    gpu: list[float] = []
    with TrtRunner(engine) as runner:
        def record(i: int, ms: float) -> None:
            gpu.append(float(runner.last_gpu_ms))
            on_run(i, ms)

        stats = measure(runner, feed, warmup=cfg.warmup, iters=cfg.iters, min_duration_s=cfg.duration_s,
                        on_run=record)
    return LatencyStats.from_samples(stats.samples_ms, warmup=stats.warmup, stopped_by=stats.stopped_by,
                                     gpu_samples_ms=gpu or None)


def _measure_coreml(built: _Built, cfg: BenchConfig, tmp: Path,
                    on_run: Callable[[int, float], None]) -> LatencyStats:
    """Trace, convert to an ML Program and time ``MLModel.predict`` (macOS only).

    The conversion goes through the Core ML exporter's helpers, so the rows get the same workarounds
    for coremltools 9 (static sizes frozen into the trace, the epsilon-adding pass removed).
    """
    import torch

    from ._deps import import_coremltools
    from .export.coreml import conversion_pipeline, freeze_traced_shapes

    ct = import_coremltools(purpose="the Core ML rows")
    x = torch.randn(cfg.batch, 3, *cfg.size)
    with torch.no_grad():
        traced = torch.jit.trace(built.module.eval(), x, check_trace=False)
    freeze_traced_shapes(traced)
    precision = ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(x.shape))],
                         convert_to="mlprogram", compute_precision=precision,
                         pass_pipeline=conversion_pipeline(ct))
    feed = {"input": x.numpy()}
    return measure(lambda: mlmodel.predict(feed), warmup=cfg.warmup, iters=cfg.iters,
                   min_duration_s=cfg.duration_s, on_run=on_run)


# --------------------------------------------------------------------------------------------------
# Dense MatMul peaks.
# --------------------------------------------------------------------------------------------------
def _matmul_onnx(path: Path, b: np.ndarray) -> None:
    """``c = a @ b`` with ``b`` a constant initializer (as a model's weights are: ONNX Runtime prepacks it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = b.shape[0]
    et = TensorProto.FLOAT16 if b.dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul_peak",
                              [helper.make_tensor_value_info("a", et, [n, n])],
                              [helper.make_tensor_value_info("c", et, [n, n])],
                              initializer=[numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.save(model, str(path))


def measure_peak(backend: str, status: BackendStatus, *, precision: str, threads: int, tmp: Path,
                 n: int | None = None) -> PeakResult | None:
    """Dense ``n x n`` MatMul GFLOP/s through ``backend`` on its device, from the fastest of its timed
    runs (a peak, so that a busy moment does not lower it; ``bench`` measures it before and after the
    rows and keeps the better). None where the harness cannot measure it
    (TensorRT, Core ML). Rows may exceed 100 % of it: convolution algorithms such as Winograd do fewer
    multiplications than the MACs counted."""
    import torch

    on_gpu = status.device.startswith("cuda")
    n = n or (GPU_MATMUL_N if on_gpu else CPU_MATMUL_N)
    flop = 2.0 * n ** 3
    if backend in ("torch", "torch-cudagraph"):
        device = "cuda" if on_gpu else "cpu"
        dtype = torch.float16 if precision == "fp16" else torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        stats = measure(lambda: torch.matmul(a, b), warmup=2, iters=10, min_duration_s=2.0, cuda_events=on_gpu)
        ms = min(stats.samples_ms) if not on_gpu else stats.gpu_median_ms
    elif backend == "onnxruntime":
        from .backends.onnxrt import OrtRunner

        path = tmp / f"matmul-{n}-{precision}.onnx"
        rng = np.random.default_rng(0)
        dt = np.float16 if precision == "fp16" else np.float32
        _matmul_onnx(path, rng.standard_normal((n, n)).astype(dt))
        feed = {"a": rng.standard_normal((n, n)).astype(dt)}
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
        with OrtRunner(path, providers=providers, threads=threads) as runner:
            stats = measure(runner, feed, warmup=2, iters=10, min_duration_s=2.0)
        ms = stats.min_ms
    else:
        return None  # TensorRT / Core ML peaks are not measured by this harness
    return PeakResult(backend, precision, status.device or "cpu", n, flop / (ms * 1e-3) / 1e9, stats)


# --------------------------------------------------------------------------------------------------
# Ratios and flags.
# --------------------------------------------------------------------------------------------------
def ordering_flag(measured: float | None, paper: float | None, *, tie: float = TIE_BAND) -> str | None:
    """``""`` when a measured ratio is on the same side of 1 as the published one, ``"flip"`` when not,
    ``"flip~"`` when not but the paper's ratio is within ``tie`` of 1 (a near tie); None if one is missing."""
    if measured is None or paper is None:
        return None
    if (measured - 1.0) * (paper - 1.0) >= 0:
        return ""
    return "flip~" if abs(paper - 1.0) <= tie else "flip"


def _with_ratios(rows: list[BenchRow], *, task: str, side: int) -> list[BenchRow]:
    """Fill the ratio and flag fields: measured against the reference on the same backend, published
    from the same column of the published table."""
    out = []
    for row in rows:
        changes: dict[str, Any] = {}
        col = "paper_coreml_ms" if row.paper_column.startswith("coreml") else "paper_trt_ms"
        for ref, key in (("resnet101", "resnet101"), ("nextvit_small", "nextvit_s")):
            base = next((r for r in rows if r.model == ref and r.backend == row.backend), None)
            measured = row.median_ms / base.median_ms if base is not None and base.median_ms > 0 else None
            ref_pub = published.lookup(ref, task=task, image_size=side)
            theirs = None if ref_pub is None else (
                ref_pub.coreml_ms_batch1 if col == "paper_coreml_ms" else ref_pub.trt_fp16_ms_batch8)
            mine = getattr(row, col)
            paper = mine / theirs if mine and theirs else None
            changes[f"ratio_{key}"] = measured
            changes[f"paper_ratio_{key}"] = paper
            changes[f"flag_{key}"] = ordering_flag(measured, paper)
        out.append(dataclasses.replace(row, **changes))
    return out


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------
def bench(cfg: BenchConfig, *, progress: BenchProgress | None = None) -> BenchReport:
    """Measure every model x backend of ``cfg``; returns the :class:`BenchReport`.

    Errors the user can fix (unknown model/backend, bad numbers, missing timm for a named baseline)
    raise :class:`~nextvit_deploy.errors.DeployError` before any work starts; a model that fails on one
    backend becomes an entry of ``report.failures`` and the run goes on.
    """
    import torch

    t_start = time.perf_counter()
    progress = progress or BenchProgress()
    if cfg.task not in published.TASK_ROWS:
        raise BadInput(f"unknown --task {cfg.task!r}: choose cls or det")
    if cfg.precision not in PRECISIONS:
        raise BadInput(f"--precision {cfg.precision} is not measured by bench: choose fp32 or fp16")
    if cfg.batch < 1:
        raise BadInput(f"--batch must be at least 1, got {cfg.batch}")
    if cfg.iters < 1 or cfg.warmup < 0:
        raise BadInput("--iters must be at least 1 and --warmup at least 0")
    if cfg.duration_s is not None and cfg.duration_s < 0:
        raise BadInput(f"--duration must be 0 or more seconds, got {cfg.duration_s}")
    if cfg.threads is not None and cfg.threads < 1:
        raise BadInput(f"--threads must be at least 1, got {cfg.threads}")
    requested = cfg.backends or BACKENDS
    for b in requested:
        if b not in BACKENDS:
            close = difflib.get_close_matches(b, BACKENDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInput(f"unknown backend {b!r}{hint}: choose from {', '.join(BACKENDS)}")
    models = resolve_models(cfg)
    warnings: list[str] = []
    if not available("timm"):
        baselines = [m for m in models if not _is_nextvit(m)]
        if baselines and cfg.models:
            raise MissingDependency(f"timm is needed for {', '.join(baselines)} but not installed; "
                                    "install with: pip install 'nextvit-deploy[timm]'")
        if baselines:
            warnings.append(f"timm is not installed: skipped {', '.join(baselines)} "
                            "(pip install 'nextvit-deploy[timm]')")
            models = [m for m in models if _is_nextvit(m)]
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


def _run(cfg: BenchConfig, *, models: list[str], run_on: list[BackendStatus], statuses: tuple[BackendStatus, ...],
         threads: int, warnings: list[str], progress: BenchProgress, t_start: float) -> BenchReport:
    labels = machine_labels(threads)
    simplify = cfg.simplify if cfg.simplify is not None else any(s.name == "tensorrt" for s in run_on)
    static = any(s.name == "tensorrt" for s in run_on)
    labels["flags"] = {"simplify": simplify, "opset": cfg.opset,
                       "onnx_batch": "static" if static else "dynamic (traced at batch 1)",
                       "ort_graph_optimization": "all", "torch_inference_mode": True}
    needs_onnx = any(s.name in ("onnxruntime", "tensorrt") for s in run_on)

    progress.start(len(run_on) + len(models) * (1 + len(run_on)))
    rows: list[BenchRow] = []
    failures: list[dict[str, str]] = []
    peaks: list[PeakResult] = []
    with tempfile.TemporaryDirectory(prefix="nextvit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for status in run_on:
            progress.step(f"MatMul peak: {status.name}")
            try:
                peak = measure_peak(status.name, status, precision=cfg.precision, threads=threads, tmp=tmp)
            except Exception as exc:  # a peak that cannot be measured leaves the fraction empty
                peak = None
                warnings.append(f"MatMul peak of {status.name} not measured: {type(exc).__name__}: {exc}")
            if peak is not None:
                peaks.append(peak)
            progress.step(f"MatMul peak: {status.name}", advance=1)
        peak_by = {p.backend: p for p in peaks}
        task, side = cfg.published_task, (cfg.size[0] if cfg.size[0] == cfg.size[1] else 0)
        for name in models:
            display = published.display_name(name)
            progress.step(f"{display}: building, counting MACs" + (", exporting ONNX" if needs_onnx else ""))
            try:
                from .flops import count_macs

                built = build_bench_model(name, task=cfg.task, image_size=cfg.size)
                flops = count_macs(built.module, cfg.size)
                onnx_path = tmp / f"{name}.onnx"
                if needs_onnx:
                    built.notes.extend(_export_onnx(built, cfg, onnx_path, simplify=simplify, static=static))
            except DeployError:
                raise
            except Exception as exc:
                failures.append({"model": name, "backend": "*", "error": f"{type(exc).__name__}: {exc}"[:300]})
                progress.note(f"{display}: preparation failed: {type(exc).__name__}: {str(exc)[:120]}")
                progress.step(display, advance=1 + len(run_on))
                continue
            progress.step(display, advance=1)
            pub = published.lookup(name, task=task, image_size=side)
            for status in run_on:
                desc = f"{display} on {status.name}"
                progress.step(desc)

                def on_run(i: int, ms: float, _desc: str = desc) -> None:
                    progress.step(f"{_desc}: run {i}, {ms:.0f} ms")

                try:
                    if status.name == "torch":
                        stats = _measure_torch(built, cfg, status, graphs=False, on_run=on_run)
                    elif status.name == "torch-cudagraph":
                        stats = _measure_torch(built, cfg, status, graphs=True, on_run=on_run)
                    elif status.name == "onnxruntime":
                        stats = _measure_ort(onnx_path, cfg, status, threads, on_run)
                    elif status.name == "tensorrt":
                        stats = _measure_tensorrt(onnx_path, name, built, cfg, tmp, on_run)
                    else:
                        stats = _measure_coreml(built, cfg, tmp, on_run)
                except DeployError:
                    raise
                except Exception as exc:
                    failures.append({"model": name, "backend": status.name,
                                     "error": f"{type(exc).__name__}: {exc}"[:300]})
                    progress.note(f"{desc} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    progress.step(desc, advance=1)
                    continue
                latency = LatencyReport(name=name, backend=status.name, precision=cfg.precision,
                                        batch=cfg.batch, input_shape=(cfg.batch, 3, *cfg.size),
                                        device=status.device or "cpu", threads=threads, stats=stats,
                                        versions={status.name: status.version})
                ms = stats.gpu_median_ms if stats.gpu_median_ms else stats.median_ms
                achieved = 2.0 * flops.macs * cfg.batch / (ms * 1e-3) / 1e9
                peak = peak_by.get(status.name)
                for w in stats.warnings:
                    if w.startswith("noisy"):
                        warnings.append(f"{desc}: {w}")
                column = "coreml_ms_batch1" if status.name == "coreml" else "trt_fp16_ms_batch8"
                rows.append(BenchRow(
                    model=name, display=display, backend=status.name, latency=latency, gmacs=flops.gmacs,
                    params_m=flops.params_m, achieved_gflops=achieved,
                    peak_fraction=achieved / peak.gflops if peak else None,
                    paper_trt_ms=pub.trt_fp16_ms_batch8 if pub else None,
                    paper_coreml_ms=pub.coreml_ms_batch1 if pub else None,
                    paper_metric=pub.metric_value if pub else None, metric=pub.metric if pub else "",
                    paper_status=pub.status if pub else "", paper_column=column, notes=tuple(built.notes)))
                progress.step(f"{desc}: {stats.median_ms:.0f} ms", advance=1)
            del built
            gc.collect()
        # Measure the peaks again at the end and keep the better one: a busy moment on a shared machine
        # must not lower the reference that every row is divided by.
        for status in run_on:
            try:
                again = measure_peak(status.name, status, precision=cfg.precision, threads=threads, tmp=tmp)
            except Exception:
                continue
            first = peak_by.get(status.name)
            if again is not None and (first is None or again.gflops > first.gflops):
                peak_by[status.name] = again
        peaks = [peak_by[s.name] for s in run_on if s.name in peak_by]
        rows = [dataclasses.replace(r, peak_fraction=r.achieved_gflops / peak_by[r.backend].gflops)
                if r.backend in peak_by else r for r in rows]
    rows = _with_ratios(rows, task=task, side=side)
    fewest = min((r.latency.stats.runs for r in rows), default=TARGET_RUNS)
    if fewest < TARGET_RUNS:
        warnings.append(f"some rows rest on {fewest} timed runs (fewer than {TARGET_RUNS}): p99 there is close to "
                        "the slowest run; raise --iters and --duration for tighter percentiles")
    return BenchReport(config=cfg, labels=labels, backends=statuses, peaks=tuple(peaks), rows=tuple(rows),
                       failures=tuple(failures), warnings=tuple(warnings), wall_s=time.perf_counter() - t_start)


# --------------------------------------------------------------------------------------------------
# Outputs: Markdown, CSV, JSON, PNG (all from the report's dict, so benchmarks/report.py reuses them).
# --------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f", empty: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def _flag(value: str | None) -> str:
    return {"flip": "**flip**", "flip~": "flip~ (tie in paper)", "": "same"}.get(value, "–") if value is not None \
        else "–"


def labels_line(d: dict[str, Any]) -> str:
    """One line naming the machine, versions, threads and flags of a report dict."""
    lab, cfg = d["labels"], d["config"]
    v = lab.get("versions", {})
    vers = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "onnx", "timm", "onnxsim", "tensorrt",
                                                 "coremltools") if k in v)
    gpu = f", GPU {lab['gpu']}" if lab.get("gpu") else ", no GPU"
    h, w = cfg["image_size"]
    return (f"{lab['cpu']} ({lab['cores']} cores{gpu}), {lab['os']}; {vers}; threads {lab['threads']}; "
            f"batch {cfg['batch']}, {cfg['precision']}, {h}x{w}, task {cfg['task']}; warm-up {cfg['warmup']}, "
            f"iters {cfg['iters']}, duration {cfg['duration_s']} s; flags {lab.get('flags', {})}; "
            f"measured {lab.get('date_utc', '')}")


def render_markdown(d: dict[str, Any], *, title: str | None = None) -> str:
    """Markdown of a bench report dict: labels, main table, ratios table, peaks, skipped backends."""
    cfg = d["config"]
    h, w = cfg["image_size"]
    what = "backbone (feature maps)" if cfg["task"] == "det" else "classification"
    heading = title or f"{what.capitalize()} at {h}x{w}, batch {cfg['batch']}, {cfg['precision']}"
    lines = [f"## {heading}", "",
             f"Measured on: {labels_line(d)}.", ""]
    rows = d["rows"]
    gpu = any(r.get("gpu_median_ms") is not None for r in rows)
    lines += ["| Model | Backend | median ms | p90 ms | p99 ms | " + ("GPU ms (CUDA events) | " if gpu else "")
              + "runs | img/s | GMACs | Params (M) | GFLOP/s | % of MatMul peak | paper TRT ms | paper CoreML ms "
              "| paper metric |", "|---|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|" * 9]
    for r in rows:
        frac = _fmt(100 * r["peak_fraction"], ".0f") + " %" if r["peak_fraction"] is not None else "–"
        metric = f"{_fmt(r['paper_metric'], '.1f')} {r['metric']}" if r["paper_metric"] is not None else "–"
        lines.append(f"| {r['display']} | {r['backend']} | {_fmt(r['median_ms'], '.1f')} | {_fmt(r['p90_ms'], '.1f')} "
                     f"| {_fmt(r['p99_ms'], '.1f')} | " + (f"{_fmt(r.get('gpu_median_ms'), '.2f')} | " if gpu else "")
                     + f"{r['runs']} | {_fmt(r['throughput_ips'], '.2f')} "
                     f"| {_fmt(r['gmacs'], '.2f')} | {_fmt(r['params_m'], '.1f')} | {_fmt(r['achieved_gflops'], '.1f')} "
                     f"| {frac} | {_fmt(r['paper_trt_ms'], '.1f')} | {_fmt(r['paper_coreml_ms'], '.1f')} | {metric} |")
    lines += ["", "Latency ratios (row / reference, same backend, same run) next to the paper's "
              "(TensorRT column; CoreML column for Core ML rows). `flip`: the ordering differs from the paper; "
              f"`flip~`: it differs but the paper's ratio is within {int(TIE_BAND * 100)} % of 1 (a near tie).", "",
              "| Model | Backend | × ResNet-101 | paper × ResNet-101 | ordering | × Next-ViT-S | paper × Next-ViT-S "
              "| ordering |", "|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['display']} | {r['backend']} | {_fmt(r['ratio_resnet101'])} "
                     f"| {_fmt(r['paper_ratio_resnet101'])} | {_flag(r['flag_resnet101'])} "
                     f"| {_fmt(r['ratio_nextvit_s'])} | {_fmt(r['paper_ratio_nextvit_s'])} "
                     f"| {_flag(r['flag_nextvit_s'])} |")
    if d.get("peaks"):
        lines += ["", "Dense MatMul peak per backend (same run, same precision and device): "
                  + "; ".join(f"{p['backend']} {p['gflops']:.1f} GFLOP/s ({p['n']}x{p['n']} {p['precision']} "
                              f"on {p['device']})" for p in d["peaks"]) + "."]
    skipped = [b for b in d.get("backends", []) if not b["available"]]
    if skipped:
        lines += ["", "Backends not measured here: " + "; ".join(f"{b['name']} ({b['reason']})" for b in skipped)
                  + "."]
    notes = sorted({f"{r['display']}: {n}" for r in rows for n in r.get("notes", []) if r["backend"] == rows[0]["backend"]})
    if notes:
        lines += ["", "Pipeline notes: " + "; ".join(notes) + "."]
    for f in d.get("failures", []):
        lines.append(f"\nFailed: {f['model']} on {f['backend']}: {f['error']}")
    if d.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w}" for w in d["warnings"]]]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("model", "display", "backend", "precision", "batch", "input_shape", "device", "threads", "median_ms",
              "p90_ms", "p99_ms", "gpu_median_ms", "runs", "spread", "noisy", "throughput_ips", "gmacs", "params_m",
              "achieved_gflops", "peak_fraction", "paper_trt_ms", "paper_coreml_ms", "paper_metric", "metric",
              "paper_status", "ratio_resnet101", "paper_ratio_resnet101", "flag_resnet101", "ratio_nextvit_s",
              "paper_ratio_nextvit_s", "flag_nextvit_s")


def render_csv(d: dict[str, Any]) -> str:
    """One line per row; the labels line goes into a leading ``#`` comment."""
    buf = io.StringIO()
    buf.write(f"# {labels_line(d)}\n")
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in d["rows"]:
        writer.writerow({k: ("x".join(map(str, r[k])) if k == "input_shape" else r[k]) for k in CSV_FIELDS})
    return buf.getvalue()


_SERIES_STYLE = {"torch": ("o", "tab:blue"), "torch-cudagraph": ("D", "tab:cyan"), "onnxruntime": ("s", "tab:orange"),
                 "tensorrt": ("^", "tab:green"), "coreml": ("v", "tab:purple")}


def plot_accuracy_latency(d: dict[str, Any], path: str | Path) -> Path:
    """The paper's accuracy-latency figure for this run: measured latency (x, log) vs published metric (y).

    One series per backend, Next-ViT S/B/L joined by a line as in the paper. Beside every measured point
    a faded point of the same series shows where the paper's TensorRT numbers would put that model on
    this backend: published ms scaled so that ResNet-101 (or Next-ViT-S without it) coincides with its
    measurement. A faded point right of its measured partner means the model is relatively faster here
    than in the paper, left of it relatively slower.
    """
    mpl = require("matplotlib", purpose="the accuracy-latency plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in d["rows"] if r["paper_metric"] is not None]
    cfg = d["config"]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    metric = rows[0]["metric"] if rows else "top1"
    anchors_used = set()
    for index, backend in enumerate(backends):
        marker, color = _SERIES_STYLE.get(backend, ("o", None))
        pts = [r for r in rows if r["backend"] == backend]
        col = "paper_coreml_ms" if backend == "coreml" else "paper_trt_ms"
        scale, anchor_name = None, None
        for ref in ("resnet101", "nextvit_small"):
            anchor = next((r for r in pts if r["model"] == ref and r[col]), None)
            if anchor:
                scale, anchor_name = anchor["median_ms"] / anchor[col], anchor["display"]
                break
        if scale:
            anchors_used.add(anchor_name)
            pub = [r for r in pts if r[col]]
            ax.scatter([r[col] * scale for r in pub], [r["paper_metric"] for r in pub], marker=marker, s=55,
                       color=color, alpha=0.22, zorder=2,
                       label=f"paper ({'Core ML' if col == 'paper_coreml_ms' else 'TensorRT FP16'}), "
                             f"scaled to {backend} at {anchor_name}")
            nv = sorted((r for r in pub if r["model"].startswith("nextvit_")), key=lambda r: r[col])
            if len(nv) > 1:
                ax.plot([r[col] * scale for r in nv], [r["paper_metric"] for r in nv], color=color, alpha=0.22,
                        lw=1.5, ls="--", zorder=1)
        ax.scatter([r["median_ms"] for r in pts], [r["paper_metric"] for r in pts], marker=marker, s=60,
                   color=color, zorder=3, label=f"measured: {backend}")
        nv = sorted((r for r in pts if r["model"].startswith("nextvit_")), key=lambda r: r["median_ms"])
        if len(nv) > 1:
            ax.plot([r["median_ms"] for r in nv], [r["paper_metric"] for r in nv], color=color, lw=1.5, zorder=2)
        for r in pts:
            ax.annotate(r["display"], (r["median_ms"], r["paper_metric"]), textcoords="offset points",
                        xytext=(5, 5) if index % 2 == 0 else (5, -11), fontsize=7.5, color=color)
    ax.set_xscale("log")
    fmt = ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.margins(x=0.12, y=0.08)
    h, w = cfg["image_size"]
    ax.set_xlabel(f"measured latency, ms per batch of {cfg['batch']} ({cfg['precision']}, {h}x{w}, log scale)")
    ax.set_ylabel(f"published {metric}" + (" (%)" if metric == "top1" else ""))
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=8, frameon=False)
    lab = d["labels"]
    fig.suptitle(f"Accuracy vs latency on {lab['cpu']} ({lab['threads']} threads"
                 + (f", {lab['gpu']}" if lab.get("gpu") else "") + "); faded: the paper's latencies", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_outputs(report: BenchReport | dict[str, Any], out_dir: str | Path, *, stem: str = "bench") -> dict[str, Path]:
    """Write ``<stem>.json``, ``.csv``, ``.md`` and ``.png`` into ``out_dir`` atomically; returns the paths.

    The PNG is skipped (with a warning in the Markdown) when matplotlib is not installed.
    """
    from .artifact import atomic_write_text, check_writable_dir

    d = report.to_dict() if isinstance(report, BenchReport) else report
    out = check_writable_dir(out_dir)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md",
             "png": out / f"{stem}.png"}
    atomic_write_text(paths["json"], json.dumps(d, indent=2) + "\n")
    atomic_write_text(paths["csv"], render_csv(d))
    md = render_markdown(d)
    if any(r["paper_metric"] is not None for r in d["rows"]):
        try:
            from .artifact import atomic_path

            with atomic_path(paths["png"]) as tmp:
                plot_accuracy_latency(d, tmp)
            md += f"\n![accuracy vs latency]({paths['png'].name})\n"
        except MissingDependency as exc:
            md += f"\nNo plot: {exc}\n"
            paths.pop("png")
    else:
        paths.pop("png")
    atomic_write_text(paths["md"], md)
    return paths
