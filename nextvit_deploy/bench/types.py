"""Configuration and result values of a bench run (frozen; the table, JSON, CSV and Markdown come from them)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import published
from ..backends.base import Availability
from ..latency import LatencyReport, LatencyStats

__all__ = ["BACKENDS", "PRECISIONS", "REFERENCE_MODELS", "TIE_BAND", "SPREAD_WIDE", "UNDER_MEASURED", "BenchConfig",
           "BackendStatus", "PeakResult", "BenchRow", "BenchReport", "BenchProgress"]

BACKENDS: tuple[str, ...] = ("torch", "torch-cudagraph", "onnxruntime", "tensorrt", "coreml")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
REFERENCE_MODELS = {"resnet101": "ResNet-101", "nextvit_small": "Next-ViT-S"}
TIE_BAND = 0.05  # a published ratio within 5 % of 1.0 is a near tie: an ordering flip there is marked "flip~"
UNDER_MEASURED = "peak under-measured"  # said instead of a fraction of a GEMM peak above 100 %
SPREAD_WIDE = 0.10  # an interquartile range of per-round ratios above this is reported as a wide spread
BackendStatus = Availability  # the name bench used before each backend reported its own availability


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
        rounds: interleaved rounds: every row (and every peak GEMM) runs a share of its timed runs per
            round, rows alternating A, B, C, A, B, C, ..., so drift hits all rows alike. Defaults to 5.
        int8: an INT8 row per model on the backends with an INT8 convention (ONNX Runtime x86 QDQ on the
            CPU, TensorRT Q/DQ), built through ``export``'s precision transform, with its speed-up over fp32.
            Defaults to True (``--no-int8`` turns it off).

    Every backend also gets an fp32 row (the base of every speed-up) and, where it runs fp16 natively (a GPU,
    Core ML), an fp16 row; see :func:`nextvit_deploy.bench.plan.row_precisions`. Core ML rows run at batch 1
    and the export's deployment target (:func:`nextvit_deploy.bench.plan.coreml_rows`), as the paper's
    Core ML column does, whatever ``batch`` is.
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
    rounds: int = 5
    int8: bool = True

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
class PeakResult:
    """Best dense GEMM throughput of one backend in one precision: the best of a small sweep of shapes
    (square ones and the model's own largest GEMMs), each timed in the same interleaved rounds as the rows.
    ``shape`` is the winning (M, K, N); ``n`` its largest side; ``sweep`` every shape's GFLOP/s."""

    backend: str
    precision: str
    device: str
    n: int
    gflops: float
    stats: LatencyStats
    shape: tuple[int, int, int] = (0, 0, 0)
    sweep: tuple[tuple[tuple[int, int, int], float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "device": self.device, "n": self.n,
                "shape": list(self.shape), "gflops": round(self.gflops, 3),
                "sweep": [{"shape": list(s), "gflops": round(g, 3)} for s, g in self.sweep],
                "stats": self.stats.to_dict()}


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
    spread_resnet101: float | None = None  # interquartile range of the per-round ratios
    spread_nextvit_s: float | None = None
    peak_note: str = ""  # "peak under-measured" when a row beat its own peak (the fraction is then empty)
    baseline: str = ""  # bench ARTIFACT...: the row every ratio_baseline divides by
    ratio_baseline: float | None = None
    spread_baseline: float | None = None
    round_medians_ms: tuple[float, ...] = ()
    speedup_vs_fp32: float | None = None  # precision rows: fp32 median / this row's median, same backend

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
            "paper_ratio_nextvit_s", "flag_nextvit_s", "spread_resnet101", "spread_nextvit_s", "peak_note",
            "baseline", "ratio_baseline", "spread_baseline", "speedup_vs_fp32")}
        s = self.latency.stats
        d.update(precision=self.latency.precision, batch=self.latency.batch, device=self.latency.device,
                 threads=self.latency.threads, input_shape=list(self.latency.input_shape),
                 median_ms=s.median_ms, p90_ms=s.p90_ms, p99_ms=s.p99_ms, throughput_ips=self.throughput_ips,
                 gpu_median_ms=s.gpu_median_ms, runs=s.runs, spread=round(s.spread, 4), noisy=s.noisy,
                 notes=list(self.notes), round_medians_ms=list(self.round_medians_ms),
                 latency=self.latency.to_dict())
        for k, v in list(d.items()):
            if isinstance(v, float):
                d[k] = round(v, 4)
        return d


@dataclass(frozen=True)
class BenchReport:
    """A whole bench run. ``bool(report)`` is True when every requested row was measured."""

    config: BenchConfig
    labels: dict[str, Any]
    backends: tuple[Availability, ...]
    peaks: tuple[PeakResult, ...]
    rows: tuple[BenchRow, ...]
    failures: tuple[dict[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    wall_s: float = 0.0
    artifacts: bool = False  # a ``bench ARTIFACT...`` run: rows are exported files, ratios against a baseline
    skipped_precisions: tuple[dict[str, str], ...] = ()  # {backend, precision, reason}: precisions not run

    def __bool__(self) -> bool:
        return bool(self.rows) and not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "nextvit-deploy-bench/2", "config": self.config.to_dict(), "labels": self.labels,
                "backends": [b.to_dict() for b in self.backends], "peaks": [p.to_dict() for p in self.peaks],
                "rows": [r.to_dict() for r in self.rows], "failures": list(self.failures),
                "warnings": list(self.warnings), "wall_s": round(self.wall_s, 2), "artifacts": self.artifacts,
                "skipped_precisions": list(self.skipped_precisions),
                "published_protocol": published.PUBLISHED_PROTOCOL}


class BenchProgress:
    """Progress callbacks (no-ops here; the CLI draws a rich progress bar)."""

    def start(self, total: int) -> None:
        """The run will take ``total`` steps (model preparations + rows)."""

    def step(self, description: str, advance: int = 0) -> None:
        """Show ``description``; advance the bar by ``advance`` steps."""

    def note(self, message: str) -> None:
        """A warning or remark worth showing while the run continues."""
