"""Ratios against the reference rows (same backend, same run), their per-round spread, and ordering flags."""
from __future__ import annotations

import dataclasses
from typing import Any

from .. import published
from .measure import spread_of
from .types import SPREAD_WIDE, TIE_BAND, BenchRow

__all__ = ["ordering_flag", "with_ratios", "with_baseline", "with_speedups", "wide_spreads"]


def ordering_flag(measured: float | None, paper: float | None, *, tie: float = TIE_BAND) -> str | None:
    """``""`` when a measured ratio is on the same side of 1 as the published one, ``"flip"`` when not,
    ``"flip~"`` when not but the paper's ratio is within ``tie`` of 1 (a near tie); None if one is missing."""
    if measured is None or paper is None:
        return None
    if (measured - 1.0) * (paper - 1.0) >= 0:
        return ""
    return "flip~" if abs(paper - 1.0) <= tie else "flip"


def with_ratios(rows: list[BenchRow], *, task: str, side: int) -> list[BenchRow]:
    """Fill the ratio, spread and flag fields: measured against the reference on the same backend (and
    precision), published from the same column of the published table."""
    out = []
    for row in rows:
        changes: dict[str, Any] = {}
        col = "paper_coreml_ms" if row.paper_column.startswith("coreml") else "paper_trt_ms"
        for ref, key in (("resnet101", "resnet101"), ("nextvit_small", "nextvit_s")):
            base = next((r for r in rows if r.model == ref and r.backend == row.backend
                         and r.latency.precision == row.latency.precision), None)
            measured = row.median_ms / base.median_ms if base is not None and base.median_ms > 0 else None
            ref_pub = published.lookup(ref, task=task, image_size=side)
            theirs = None if ref_pub is None else (
                ref_pub.coreml_ms_batch1 if col == "paper_coreml_ms" else ref_pub.trt_fp16_ms_batch8)
            mine = getattr(row, col)
            paper = mine / theirs if mine and theirs else None
            changes[f"ratio_{key}"] = measured
            changes[f"paper_ratio_{key}"] = paper
            changes[f"flag_{key}"] = ordering_flag(measured, paper)
            changes[f"spread_{key}"] = (spread_of(list(row.round_medians_ms), list(base.round_medians_ms))
                                        if base is not None and base is not row else None)
        out.append(dataclasses.replace(row, **changes))
    return out


def with_baseline(rows: list[BenchRow], baseline: str) -> list[BenchRow]:
    """``bench ARTIFACT...``: every row over the ``baseline`` row, with the spread of the per-round ratios."""
    base = next(r for r in rows if r.model == baseline)
    return [dataclasses.replace(r, baseline=baseline, ratio_baseline=r.median_ms / base.median_ms,
                                spread_baseline=None if r is base else spread_of(list(r.round_medians_ms),
                                                                                  list(base.round_medians_ms)))
            for r in rows]


def with_speedups(rows: list[BenchRow], base_precision: str = "fp32") -> list[BenchRow]:
    """Precision rows: the ``base_precision`` row's median over this row's, same model and backend."""
    out = []
    for r in rows:
        base = next((b for b in rows if b.model == r.model and b.backend == r.backend
                     and b.latency.precision == base_precision), None)
        if base is None or base is r or r.latency.precision == base_precision:
            out.append(r)
        else:
            out.append(dataclasses.replace(r, speedup_vs_fp32=base.median_ms / r.median_ms))
    return out


def wide_spreads(rows: list[BenchRow]) -> list[str]:
    """Warnings for ratios whose per-round spread (IQR / median) is above :data:`SPREAD_WIDE`."""
    out = []
    for r in rows:
        for what, spread in (("× ResNet-101", r.spread_resnet101), ("× Next-ViT-S", r.spread_nextvit_s),
                             (f"× {r.baseline}", r.spread_baseline)):
            if spread is not None and spread > SPREAD_WIDE:
                where = r.backend if r.latency.precision == "fp32" or r.baseline else f"{r.backend} {r.latency.precision}"
                out.append(f"{r.display} on {where}: the {what} ratio varies by {100 * spread:.0f} % between "
                           f"rounds (IQR / median > {100 * SPREAD_WIDE:.0f} %): the machine was busy; raise "
                           "--rounds or rerun on an idle machine")
    return out
