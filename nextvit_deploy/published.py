"""The Next-ViT paper's published latencies and accuracies, as data.

Source: ``resources/paper_latency.csv`` (copied from the project's shared data with its provenance in
``resources/README.md``): arXiv 2207.05501 and github.com/bytedance/Next-ViT. TensorRT numbers are
TensorRT 8.0.3 FP16, batch 8, milliseconds per batch (GPU believed to be a T4); CoreML numbers are
batch 1 on an iPhone 12 Pro Max. Rows marked ``digitized`` were read off the paper's figure
(about 0.1-0.2 ms error). This module is the only place the harness reads published numbers from.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

__all__ = ["PublishedRow", "published_rows", "lookup", "rows_for", "display_name", "PUBLISHED_PROTOCOL",
           "CSV_NAME", "TASK_ROWS", "DEFAULT_MODELS"]

CSV_NAME = "paper_latency.csv"
PUBLISHED_PROTOCOL = {
    "trt": "TensorRT 8.0.3 FP16, batch 8, ms per batch, NVIDIA T4 (per third parties)",
    "coreml": "coremltools 5.2 neuralnetwork, batch 1, ms per image, iPhone 12 Pro Max (iOS 16)",
}
# The CLI's --task -> which published rows it compares with, at which default image size.
TASK_ROWS: dict[str, tuple[str, int]] = {"cls": ("cls", 224), "det": ("det-maskrcnn", 512)}
# The representative subset run by default (finishes in about 5 minutes on a 2-core CPU at 224).
DEFAULT_MODELS: dict[str, tuple[str, ...]] = {
    "cls": ("nextvit_small", "nextvit_base", "nextvit_large", "resnet101", "convnext_tiny", "poolformer_s24"),
    "det": ("nextvit_small", "resnet101"),
}


@dataclass(frozen=True)
class PublishedRow:
    """One row of the published table. Latencies in milliseconds; None where not published."""

    model: str
    timm_name: str | None
    task: str
    image_size: int
    trt_fp16_ms_batch8: float | None
    coreml_ms_batch1: float | None
    metric_value: float | None
    metric: str
    status: str
    note: str

    @property
    def is_nextvit(self) -> bool:
        return bool(self.timm_name and self.timm_name.startswith("nextvit_"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _float(text: str) -> float | None:
    text = text.strip()
    return float(text) if text else None


@functools.lru_cache(maxsize=1)
def published_rows() -> tuple[PublishedRow, ...]:
    """Every row of the packaged CSV, in file order."""
    text = resources.files("nextvit_deploy").joinpath("resources").joinpath(CSV_NAME).read_text(encoding="utf-8")
    rows = []
    for rec in csv.DictReader(text.splitlines()):
        rows.append(PublishedRow(
            model=rec["model"].strip(), timm_name=rec["timm_name"].strip() or None, task=rec["task"].strip(),
            image_size=int(rec["image_size"]), trt_fp16_ms_batch8=_float(rec["trt_fp16_ms_batch8"]),
            coreml_ms_batch1=_float(rec["coreml_ms_batch1"]), metric_value=_float(rec["top1_or_metric"]),
            metric=rec["metric"].strip(), status=rec["status"].strip(), note=rec["note"].strip()))
    return tuple(rows)


def lookup(name: str, *, task: str = "cls", image_size: int = 224) -> PublishedRow | None:
    """The published row for ``name`` (timm name or the paper's model name, any case) at ``task`` and
    ``image_size``; None when the paper has no such row."""
    key = name.strip().lower()
    for row in published_rows():
        if row.task == task and row.image_size == image_size and key in (
                (row.timm_name or "").lower(), row.model.lower()):
            return row
    return None


def rows_for(task: str, image_size: int) -> list[PublishedRow]:
    """Published rows of ``task`` at ``image_size`` that a harness can build (``timm_name`` set)."""
    return [r for r in published_rows() if r.task == task and r.image_size == image_size and r.timm_name]


def display_name(name: str) -> str:
    """The paper's name for a timm name (``resnet101`` -> ``ResNet-101``), else ``name`` itself."""
    for row in published_rows():
        if row.timm_name == name:
            return row.model
    return name
