"""Which precisions a default ``bench`` run times on each backend, and how Core ML rows are configured.

Every backend gets fp32; fp16 where the backend runs it natively (a GPU, or Core ML), never emulated on a CPU;
int8 in the backend's own convention from ``export``'s precision transform: ONNX Runtime's x86 QDQ graph
(U8S8) on the CPU execution provider, TensorRT's Q/DQ graph. A precision not run on a backend is reported with
the reason, so the table says "not run here" instead of leaving a silent gap.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .types import BenchConfig

__all__ = ["INT8_CONVENTIONS", "CoreMLRows", "coreml_rows", "row_precisions", "row_batch", "int8_convention_name"]

# bench backend -> the INT8 convention of export's precision transform it runs (the key ``transform_graph`` takes)
INT8_CONVENTIONS: dict[str, str] = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
_INT8_NAMES = {"onnxruntime": "ONNX Runtime x86 QDQ, U8S8", "tensorrt": "TensorRT Q/DQ"}


@dataclass(frozen=True)
class CoreMLRows:
    """How Core ML rows are timed: the paper's Core ML column is batch 1 on an iPhone, and ``export --target
    coreml`` converts for ``min_target`` (its ``--min-target`` default), so bench converts the same way."""

    batch: int
    min_target: str

    def describe(self) -> str:
        return f"batch {self.batch}, minimum deployment target {self.min_target} (as export --target coreml)"


def coreml_rows() -> CoreMLRows:
    """Batch 1 at the deployment target ``export`` uses by default (read from ``ExportRequest``, not copied)."""
    from ..export import ExportRequest

    default = next(f.default for f in dataclasses.fields(ExportRequest) if f.name == "min_deployment_target")
    return CoreMLRows(batch=1, min_target=str(default))


def row_batch(backend: str, cfg: BenchConfig) -> int:
    """Images per call of a row on ``backend``: ``cfg.batch``, except Core ML rows (:func:`coreml_rows`)."""
    return coreml_rows().batch if backend == "coreml" else cfg.batch


def _native_fp16(status: Any) -> bool:
    device = status.device or ""
    return device.startswith("cuda") or status.name == "coreml"


def row_precisions(status: Any, cfg: BenchConfig, fp16_status: Any) -> tuple[list[str], list[dict[str, str]]]:
    """(precisions to time on the backend of ``status``, one {backend, precision, reason} per precision not run).

    ``status`` is the backend's availability in ``cfg.precision``, ``fp16_status`` in fp16 (the backend's own
    answer on whether bench can run fp16 there). fp32 rows are always timed: every speed-up is over fp32.
    """
    name = status.name
    wanted = ["fp32", "fp16", "int8"]
    run: list[str] = []
    skipped: list[dict[str, str]] = []

    def skip(precision: str, reason: str) -> None:
        skipped.append({"backend": name, "precision": precision, "reason": reason})

    for precision in wanted:
        if precision == cfg.precision or precision == "fp32":
            run.append(precision)
        elif precision == "fp16":
            if not fp16_status.available:  # the backend's own reason, without its advice on --precision
                skip("fp16", (fp16_status.reason or "not available here").split(": use ")[0])
            elif not _native_fp16(fp16_status):
                skip("fp16", f"no native fp16 on {fp16_status.device or 'this device'} (bench does not emulate it)")
            else:
                run.append("fp16")
        elif not cfg.int8:
            skip("int8", "turned off (--no-int8)")
        elif name not in INT8_CONVENTIONS:
            skip("int8", "no INT8 convention for this backend in export's precision transform")
        elif name == "onnxruntime" and (status.device or "cpu") != "cpu":
            skip("int8", "the x86 QDQ convention targets the CPU execution provider; this run uses "
                         f"{status.device}")
        else:
            run.append("int8")
    return run, skipped


def int8_convention_name(backend: str) -> str:
    """Human name of the INT8 convention a backend's int8 rows use."""
    return _INT8_NAMES.get(backend, "")
