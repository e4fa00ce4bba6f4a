"""The precision table of a bench report: per backend and model, fp32 / fp16 / int8 medians, each precision's
speed-up over fp32 on the same backend, its fraction of the GEMM peak in the same precision, and (when a
digits accuracy report is given) the top-1 drop that precision's convention costs on the digits model.

The accuracy column is read from ``benchmarks/results/accuracy_digits_eval.json`` (written by
``benchmarks/accuracy_digits_eval.py`` through ``nextvit-deploy eval``): bench never measures accuracy, and
the digits model is not one of the timed models; the column says what the same precision transform costs in
top-1 on a model with trained weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import BadInput
from .types import UNDER_MEASURED

__all__ = ["PRECISION_ORDER", "EVAL_TARGETS", "peak_cell", "load_accuracy", "top1_drop", "precision_table"]

PRECISION_ORDER = ("fp32", "fp16", "int8")
EVAL_TARGETS = {"onnxruntime": "onnx", "tensorrt": "trt", "coreml": "coreml"}  # bench backend -> eval row prefix


def _fmt(value: Any, spec: str = ".2f", empty: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def peak_cell(r: dict[str, Any]) -> str:
    """A row's fraction of its GEMM peak as text: never above 100 %. A fraction above 1 (a report written by an
    older bench, before peaks were clamped) reads "peak under-measured", as a fresh run would say."""
    fraction = r.get("peak_fraction")
    if r.get("peak_note"):
        return str(r["peak_note"])
    if fraction is None:
        return "–"
    if fraction > 1.0:
        return UNDER_MEASURED
    return f"{100 * fraction:.0f} %"


def load_accuracy(path: str | Path) -> dict[str, Any]:
    """The digits accuracy report at ``path`` (one-line :class:`BadInput` when it is missing or not one)."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p} does not exist: pass the JSON that benchmarks/accuracy_digits_eval.py wrote "
                       "(benchmarks/results/accuracy_digits_eval.json)")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{p} is not JSON ({type(exc).__name__}): pass accuracy_digits_eval.json") from None
    rows = d.get("rows") if isinstance(d, dict) else None
    if not isinstance(rows, dict) or not any(isinstance(r, dict) and "top1_drop" in r for r in rows.values()):
        raise BadInput(f"{p} has no eval rows with a top1_drop: pass accuracy_digits_eval.json, not another report")
    return {"source": str(path), "rows": rows, "environment": d.get("environment", {}),
            "test_images": d.get("test_images")}


def top1_drop(accuracy: dict[str, Any] | None, backend: str, precision: str) -> float | None:
    """The digits model's top-1 drop (points, eval's reference minus the artifact) of ``precision`` in
    ``backend``'s convention; None where the accuracy report has no such row (or it failed)."""
    if not accuracy or backend not in EVAL_TARGETS:
        return None
    row = accuracy["rows"].get(f"{EVAL_TARGETS[backend]}_{precision}")
    if not isinstance(row, dict) or row.get("exit_code", 0) not in (0, None):
        return None
    drop = row.get("top1_drop")
    return float(drop) if isinstance(drop, (int, float)) else None


def precision_table(d: dict[str, Any], accuracy: dict[str, Any] | None = None) -> list[str]:
    """Markdown lines of the precision table (empty when the report has a single precision and none skipped)."""
    rows = d["rows"]
    precisions = [p for p in PRECISION_ORDER if any(r["precision"] == p for r in rows)]
    skipped = d.get("skipped_precisions") or []
    if len(precisions) < 2 and not skipped:
        return []
    by = {(r["model"], r["backend"], r["precision"]): r for r in rows}
    pairs = list(dict.fromkeys((r["model"], r["backend"]) for r in rows))
    others = [p for p in precisions if p != "fp32"]
    head = ["Model", "Backend", "fp32 ms"]
    for p in others:
        head += [f"{p} ms", f"{p} × fp32"]
    head += [f"{p} % of {p} GEMM peak" for p in precisions]
    if accuracy:
        head += [f"digits top-1 drop {p} (pt)" for p in others]
    lines = ["", "### Precision rows", "",
             "Each precision through `export`'s precision transform in the backend's convention (int8: ONNX Runtime "
             "x86 QDQ U8S8 on the CPU, TensorRT Q/DQ), timed in the same interleaved rounds; `× fp32` is the fp32 "
             "row's median over this one's on the same backend; each fraction is of the GEMM peak in the same "
             "precision (int8 rows: the u8 x s8 `QLinearMatMul` sweep), never above 100 %.", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for model, backend in pairs:
        base = by.get((model, backend, "fp32"))
        any_row = next(r for r in rows if r["model"] == model and r["backend"] == backend)
        cells = [any_row["display"], backend, _fmt(base["median_ms"] if base else None, ".1f")]
        for p in others:
            r = by.get((model, backend, p))
            cells += [_fmt(r["median_ms"] if r else None, ".1f"), _fmt(r.get("speedup_vs_fp32") if r else None)
                      + ("x" if r and r.get("speedup_vs_fp32") else "")]
        for p in precisions:
            r = by.get((model, backend, p))
            cells.append(peak_cell(r) if r else "–")
        if accuracy:  # the digits model is a small Next-ViT: its drop is shown on Next-ViT rows only
            nextvit = model.startswith("nextvit_")
            cells += [_fmt(top1_drop(accuracy, backend, p), "+.2f") if nextvit and by.get((model, backend, p)) else "–"
                      for p in others]
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{s['backend']} {s['precision']} ({s['reason']})" for s in skipped)
                  + "."]
    if accuracy:
        env = accuracy.get("environment") or {}
        lines += ["", f"Digits top-1 drop: from `{accuracy['source']}` (a small Next-ViT trained on the scikit-learn "
                  f"digits, {accuracy.get('test_images') or '?'} held-out images, evaluated through `nextvit-deploy "
                  "eval` against its PyTorch fp32 reference; CPU flags "
                  f"{env.get('cpu_flags') or 'not recorded'}); not measured by this bench run and not on the timed "
                  "models; shown on the Next-ViT rows (the digits model is a small Next-ViT). `–`: no such row in "
                  "that report, or not a Next-ViT row."]
    return lines
