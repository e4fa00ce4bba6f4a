"""Every file a bench run writes: Markdown, CSV, JSON and the accuracy-latency PNG, all from the report's
dict (so ``benchmarks/report.py`` reuses them)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .._deps import require
from ..errors import MissingDependency
from .precision_table import peak_cell as _peak_cell
from .precision_table import precision_table
from .types import SPREAD_WIDE, TIE_BAND, BenchReport

__all__ = ["labels_line", "render_markdown", "render_artifacts_markdown", "render_csv", "plot_accuracy_latency",
           "write_outputs", "CSV_FIELDS"]


def _backend(r: dict[str, Any], cfg: dict[str, Any]) -> str:
    return r["backend"] if r["precision"] == cfg["precision"] else f"{r['backend']} {r['precision']}"


def _spread(value: float | None) -> str:
    if value is None:
        return "–"
    return f"±{100 * value:.0f} %" + (" (wide)" if value > SPREAD_WIDE else "")


def _peaks_line(peaks: list[dict[str, Any]]) -> str:
    def one(p: dict[str, Any]) -> str:
        shape = "x".join(map(str, p.get("shape") or [p["n"]] * 3))
        return (f"{p['backend']} {p['precision']} {p['gflops']:.1f} GFLOP/s (best of {len(p.get('sweep') or [1])} "
                f"GEMM shapes: {shape} (MxKxN) on {p['device']})")

    return ("GEMM peak per backend and precision (best of a sweep incl. the model's largest GEMMs, timed in the same "
            "interleaved rounds): " + "; ".join(one(p) for p in peaks) + ".")


def render_artifacts_markdown(d: dict[str, Any], *, title: str | None = None) -> str:
    """Markdown of a ``bench ARTIFACT...`` report: one row per artifact, ratios against the baseline."""
    rows = d["rows"]
    base = rows[0]["baseline"] if rows else ""
    lines = [f"## {title or 'Exported artifacts'}", "", f"Measured on: {labels_line(d)}.", "",
             f"| Artifact | Runner | precision | batch | median ms | p90 ms | runs | img/s | GFLOP/s | % of GEMM peak "
             f"| × {base} | spread |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['display']} | {r['backend']} | {r['precision']} | {r['batch']} | {_fmt(r['median_ms'], '.2f')} "
                     f"| {_fmt(r['p90_ms'], '.2f')} | {r['runs']} | {_fmt(r['throughput_ips'], '.1f')} "
                     f"| {_fmt(r['achieved_gflops'], '.1f')} | {_peak_cell(r)} | {_fmt(r['ratio_baseline'])} "
                     f"| {_spread(r.get('spread_baseline'))} |")
    if d.get("peaks"):
        lines += ["", _peaks_line(d["peaks"])]
    if d.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w}" for w in d["warnings"]]]
    return "\n".join(lines) + "\n"


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
    flags = ", ".join(lab.get("cpu_flags") or []) or "none"
    load = lab.get("load_average")
    load_text = f"; load average {', '.join(map(str, load))}" if load else ""
    return (f"{lab['cpu']} ({lab['cores']} cores{gpu}; CPU flags {flags}{load_text}), {lab['os']}; {vers}; "
            f"threads {lab['threads']}; "
            f"batch {cfg['batch']}, {cfg['precision']}, {h}x{w}, task {cfg['task']}"
            + ("" if d.get("artifacts") or "int8" not in cfg else f", int8 rows {'on' if cfg['int8'] else 'off'}")
            + f"; warm-up {cfg['warmup']}, "
            f"iters {cfg['iters']}, rounds {cfg.get('rounds', 1)}, duration {cfg['duration_s']} s; "
            f"flags {lab.get('flags', {})}; "
            f"measured {lab.get('date_utc', '')}")


def render_markdown(d: dict[str, Any], *, title: str | None = None, accuracy: dict[str, Any] | None = None) -> str:
    """Markdown of a bench report dict: labels, main table, ratios table, precision table, peaks, skipped
    backends. ``accuracy``: a digits accuracy report (``precision_table.load_accuracy``) for the precision
    table's top-1 drop column; never measured here."""
    if d.get("artifacts"):
        return render_artifacts_markdown(d, title=title)
    cfg = d["config"]
    h, w = cfg["image_size"]
    what = "backbone (feature maps)" if cfg["task"] == "det" else "classification"
    heading = title or f"{what.capitalize()} at {h}x{w}, batch {cfg['batch']}, {cfg['precision']}"
    lines = [f"## {heading}", "",
             f"Measured on: {labels_line(d)}.", ""]
    rows = d["rows"]
    gpu = any(r.get("gpu_median_ms") is not None for r in rows)
    lines += ["| Model | Backend | median ms | p90 ms | p99 ms | " + ("GPU ms (CUDA events) | " if gpu else "")
              + "batch | runs | img/s | GMACs | Params (M) | GFLOP/s | % of its GEMM peak | paper TRT ms | paper CoreML ms "
              "| paper metric |", "|---|---|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|" * 10]
    for r in rows:
        frac = _peak_cell(r)
        metric = f"{_fmt(r['paper_metric'], '.1f')} {r['metric']}" if r["paper_metric"] is not None else "–"
        lines.append(f"| {r['display']} | {_backend(r, cfg)} | {_fmt(r['median_ms'], '.1f')} | {_fmt(r['p90_ms'], '.1f')} "
                     f"| {_fmt(r['p99_ms'], '.1f')} | " + (f"{_fmt(r.get('gpu_median_ms'), '.2f')} | " if gpu else "")
                     + f"{r['batch']} | {r['runs']} | {_fmt(r['throughput_ips'], '.2f')} "
                     f"| {_fmt(r['gmacs'], '.2f')} | {_fmt(r['params_m'], '.1f')} | {_fmt(r['achieved_gflops'], '.1f')} "
                     f"| {frac} | {_fmt(r['paper_trt_ms'], '.1f')} | {_fmt(r['paper_coreml_ms'], '.1f')} | {metric} |")
    lines += ["", "Latency ratios (row / reference, same backend, same run) next to the paper's "
              "(TensorRT column; CoreML column for Core ML rows). `flip`: the ordering differs from the paper; "
              f"`flip~`: it differs but the paper's ratio is within {int(TIE_BAND * 100)} % of 1 (a near tie).", "",
              "| Model | Backend | × ResNet-101 | spread | paper × ResNet-101 | ordering | × Next-ViT-S | spread "
              "| paper × Next-ViT-S | ordering |", "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['display']} | {_backend(r, cfg)} | {_fmt(r['ratio_resnet101'])} "
                     f"| {_spread(r.get('spread_resnet101'))} "
                     f"| {_fmt(r['paper_ratio_resnet101'])} | {_flag(r['flag_resnet101'])} "
                     f"| {_fmt(r['ratio_nextvit_s'])} | {_spread(r.get('spread_nextvit_s'))} "
                     f"| {_fmt(r['paper_ratio_nextvit_s'])} | {_flag(r['flag_nextvit_s'])} |")
    lines += ["", "`spread`: interquartile range of the per-round ratios over their median (rows are timed in "
              f"{cfg.get('rounds', 1)} interleaved rounds, A, B, C, A, B, C, ...)."]
    lines += precision_table(d, accuracy)
    if d.get("peaks"):
        lines += ["", _peaks_line(d["peaks"])]
    skipped = [b for b in d.get("backends", []) if not b["available"]]
    coreml_rows = d["labels"].get("flags", {}).get("coreml_rows")
    if skipped:
        lines += ["", "Backends not measured here: " + "; ".join(
            f"{b['name']} ({b['reason']}" + (f"; its rows would run at {coreml_rows}" if b["name"] == "coreml"
                                            and coreml_rows else "") + ")" for b in skipped) + "."]
    notes = _pipeline_notes(rows)
    if notes:
        lines += ["", "Pipeline notes: " + "; ".join(notes) + "."]
    for f in d.get("failures", []):
        lines.append(f"\nFailed: {f['model']} on {f['backend']}: {f['error']}")
    if d.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w}" for w in d["warnings"]]]
    return "\n".join(lines) + "\n"


def _pipeline_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's notes once: a model's notes shared by all its rows under its name, the others (a precision
    transform, a Core ML target) under the row's backend and precision."""
    where: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for r in rows:
        for n in r.get("notes", []):
            where.setdefault((r["display"], n), set()).add((r["backend"], r["precision"]))
    out = []
    for (display, note), places in where.items():
        count = len({(r["backend"], r["precision"]) for r in rows if r["display"] == display})
        if len(places) == count:
            out.append(f"{display}: {note}")
        else:
            out.extend(f"{display} on {b} {p}: {note}" for b, p in sorted(places))
    return sorted(set(out))


CSV_FIELDS = ("model", "display", "backend", "precision", "batch", "input_shape", "device", "threads", "median_ms",
              "p90_ms", "p99_ms", "gpu_median_ms", "runs", "spread", "noisy", "throughput_ips", "gmacs", "params_m",
              "achieved_gflops", "peak_fraction", "paper_trt_ms", "paper_coreml_ms", "paper_metric", "metric",
              "paper_status", "ratio_resnet101", "paper_ratio_resnet101", "flag_resnet101", "ratio_nextvit_s",
              "paper_ratio_nextvit_s", "flag_nextvit_s", "spread_resnet101", "spread_nextvit_s", "peak_note",
              "baseline", "ratio_baseline", "spread_baseline", "speedup_vs_fp32")


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
    backends = list(dict.fromkeys(_backend(r, cfg) for r in rows))  # one series per backend and precision
    metric = rows[0]["metric"] if rows else "top1"
    anchors_used = set()
    for index, backend in enumerate(backends):
        pts = [r for r in rows if _backend(r, cfg) == backend]
        base_precision = pts[0]["precision"] == cfg["precision"]
        marker, color = _SERIES_STYLE.get(pts[0]["backend"], ("o", None))
        marker = marker if base_precision else "P"  # precision rows: same colour as their backend, own marker
        col = "paper_coreml_ms" if pts[0]["backend"] == "coreml" else "paper_trt_ms"
        scale, anchor_name = None, None
        for ref in ("resnet101", "nextvit_small"):
            anchor = next((r for r in pts if r["model"] == ref and r[col]), None)
            if anchor:
                scale, anchor_name = anchor["median_ms"] / anchor[col], anchor["display"]
                break
        if scale and base_precision:
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
                   color=color, zorder=3,
                   label=f"measured: {backend}" + ("" if base_precision else " (y: the published fp32 metric)"))
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
    precisions = ", ".join(dict.fromkeys(r["precision"] for r in rows)) or cfg["precision"]
    ax.set_xlabel(f"measured latency, ms per batch of {cfg['batch']} ({precisions}, {h}x{w}, log scale)")
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
    from ..artifact import atomic_write_text, check_writable_dir

    d = report.to_dict() if isinstance(report, BenchReport) else report
    out = check_writable_dir(out_dir)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md",
             "png": out / f"{stem}.png"}
    atomic_write_text(paths["json"], json.dumps(d, indent=2) + "\n")
    atomic_write_text(paths["csv"], render_csv(d))
    md = render_markdown(d)
    if any(r["paper_metric"] is not None for r in d["rows"]):
        try:
            from ..artifact import atomic_path

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
