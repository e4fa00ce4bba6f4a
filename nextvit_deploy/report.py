"""Human-readable rendering of result records (the JSON comes from the same objects' ``to_dict``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from .artifact import Artifact, atomic_write_text
from .parity import ParityReport

__all__ = ["parity_table", "parity_summary", "artifact_table", "write_json"]


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def parity_table(report: ParityReport) -> Table:
    tol = report.tolerance
    title = (f"parity: {report.artifact} ({report.target}, {report.precision}) "
             f"vs {report.reference}; candidate ran on {report.candidate_device}")
    table = Table(title=title, title_justify="left")
    for col in ("case", "output", "max abs", "mean abs", "max rel", "cosine", "top-1", "top-5", "needed atol", "ok"):
        table.add_column(col, justify="right" if col not in ("case", "output") else "left")
    for case in report.cases:
        for o in case.outputs:
            table.add_row(case.case, o.name, _fmt(o.max_abs), _fmt(o.mean_abs), _fmt(o.max_rel),
                          f"{o.cosine:.7f}", _fmt(o.top1_agree, ".2f"), _fmt(o.top5_overlap, ".1f"),
                          _fmt(o.required_atol),
                          ("[green]pass[/]" if o.passed else "[red]FAIL[/]") if case.gated
                          else ("info" if o.passed else "[yellow]info: over[/]"))
    table.caption = (f"gate: max abs <= {tol.atol:g} + {tol.rtol:g} x max|ref|, cosine >= {tol.min_cosine}"
                     + (f", top-5 overlap >= {tol.min_top5:g}" if tol.min_top5 is not None else "")
                     + ("" if set(tol.gated_cases) >= {"photos", "noise"}
                        else f"; gated cases: {', '.join(tol.gated_cases)} (others are reported only)")
                     + f"  [{escape(tol.source)}]")
    return table


def parity_summary(report: ParityReport) -> str:
    if not report.cases:
        return "FAIL: no case was compared"
    w = report.worst()
    verdict = "PASS" if report else "FAIL"
    tol = report.tolerance
    needed = [f"atol {w['required_atol']:.3e} (with rtol {tol.rtol:g})", f"cosine >= {w['required_min_cosine']:.7f}"]
    if tol.min_top5 is not None and w["required_min_top5"] is not None:
        needed.append(f"top-5 overlap >= {w['required_min_top5']:.1f}")
    failed = f"; failed on {', '.join(w['failed_gates'])}" if w["failed_gates"] else ""
    return (f"{verdict}: worst max abs {w['max_abs']:.3e}, worst cosine {w['min_cosine']:.7f}{failed}; "
            f"smallest tolerance that would pass: {' and '.join(needed)} "
            f"(gate: cosine >= {tol.min_cosine:g})")


def artifact_table(art: Artifact) -> Table:
    table = Table(title=f"artifact: {art.path}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    lo, opt, hi = art.batch
    rows: list[tuple[str, Any]] = [
        ("target / precision", f"{art.target} / {art.precision}"),
        ("variant", art.variant + (" (backbone: 4 feature maps)" if art.features_only else "")),
        ("input", f"{art.input_name} {art.input_shape} ({art.preprocessing.get('input_kind', 'tensor')})"),
        ("batch", f"{lo}..{hi} dynamic (opt {opt})" if art.dynamic_batch else f"{opt} static"),
        ("outputs", ", ".join(art.output_names)),
        ("weights", f"checkpoint {art.checkpoint}" if art.checkpoint else f"random, seed {art.seed}"),
        ("sha256", art.sha256[:16] + "..."),
        ("manifest", art.manifest.name),
    ]
    d = art.details
    for key, label in (("fused_batchnorms", "BatchNorms folded"), ("batchnorm_nodes", "BatchNormalization nodes"),
                       ("nodes", "graph nodes"), ("simplifier", "simplifier")):
        if key in d:
            rows.append((label, d[key]))
    pt = d.get("precision_transform") or {}
    if pt.get("transform"):
        rows.append(("precision transform", pt["transform"]))
    if "fp32_kept" in pt:
        kept = [k.get("node", str(k)) if isinstance(k, dict) else str(k) for k in pt["fp32_kept"]]
        shown = ", ".join(kept[:5]) + (f", ... ({len(kept)} in all, see the manifest)" if len(kept) > 5 else "")
        measured = pt.get("ranges_measured", True)  # Core ML fp16 measures only with --calib-dir/--calib-images
        rows.append(("nodes kept in fp32", shown or ("none (measured activations fit fp16)" if measured
                                                     else "none (static rules only)")))
    if pt.get("calibration"):
        rows.append(("calibration", pt["calibration"].get("source", pt["calibration"])))
    elif pt.get("ranges_measured") is False:
        rows.append(("calibration", "none: activation ranges not measured (pass --calib-dir or --calib-images)"))
    if isinstance(d.get("trt_compat"), dict):
        rows.append(("TensorRT parser check", d["trt_compat"].get("summary", d["trt_compat"].get("passed"))))
    for field_name, value in rows:
        table.add_row(field_name, str(value))
    return table


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    p = Path(path)
    atomic_write_text(p, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return p
