"""Regenerate the Markdown report of the reproduced Next-ViT speed tables from bench runs.

Usage (the committed CPU report is made this way, on an idle machine):

    nextvit-deploy bench --batch 8 --out benchmarks/results/cls-224
    nextvit-deploy bench --batch 8 --task det --out benchmarks/results/det-512
    python benchmarks/report.py benchmarks/results/cls-224/bench.json benchmarks/results/det-512/bench.json \\
        --accuracy benchmarks/results/accuracy_digits_eval.json -o benchmarks/results/README.md

Each JSON becomes one section (classification at 224; backbone at 512x512 for the detection and
segmentation rows) with its precision table (fp32 / fp16 / int8 per backend, speed-up over fp32, fraction
of the GEMM peak in the same precision and, with ``--accuracy``, the digits model's top-1 drop read from
``accuracy_digits_eval.json``), preceded by a summary of where the paper's ordering holds on this machine
and what each precision buys. Nothing is measured here: the numbers are the bench run's and the accuracy
report's. A fraction of a peak above 100 % never appears: an older report's is shown as "peak under-measured".
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from nextvit_deploy.bench import TIE_BAND, labels_line, render_markdown
from nextvit_deploy.bench.precision_table import load_accuracy
from nextvit_deploy.errors import BadInput

SCHEMAS = ("nextvit-deploy-bench/1", "nextvit-deploy-bench/2")


def _section_title(d: dict[str, Any]) -> str:
    cfg = d["config"]
    h, w = cfg["image_size"]
    if cfg["task"] == "det":
        return (f"Backbone at {h}x{w} (the detection/segmentation rows: Mask R-CNN and Semantic FPN report "
                f"the backbone's latency), batch {cfg['batch']}, {cfg['precision']}")
    return f"Classification at {h}x{w}, batch {cfg['batch']}, {cfg['precision']}"


def _verdicts(d: dict[str, Any]) -> list[str]:
    """Plain sentences: per backend, which orderings of the paper hold and which flip."""
    out = []
    cfg = d["config"]
    h = cfg["image_size"][0]
    rows = [r for r in d["rows"] if r.get("precision", cfg["precision"]) == cfg["precision"]]  # the ratio rows
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        for key, ref in (("resnet101", "ResNet-101"), ("nextvit_s", "Next-ViT-S")):
            judged = [r for r in mine if r[f"flag_{key}"] is not None and r[f"ratio_{key}"] != 1.0]
            if not judged:
                continue
            same = [r["display"] for r in judged if r[f"flag_{key}"] == ""]
            flips = [f"{r['display']} ({r[f'ratio_{key}']:.2f}x here vs {r[f'paper_ratio_{key}']:.2f}x in the paper"
                     + (", a near tie there)" if r[f"flag_{key}"] == "flip~" else ")")
                     for r in judged if r[f"flag_{key}"]]
            text = f"- **{backend}, {h}px, vs {ref}**: ordering holds for {len(same)} of {len(judged)}"
            text += f" ({', '.join(same)})" if same else ""
            text += f"; differs for {'; '.join(flips)}." if flips else "."
            out.append(text)
        nv = {r["model"]: r for r in mine}
        if "nextvit_small" in nv and "resnet101" in nv:
            r = nv["nextvit_small"]
            measured, paper = r["ratio_resnet101"], r["paper_ratio_resnet101"]
            verdict = ("matches the paper's ratio within 10 %" if abs(measured - paper) <= 0.10 * paper else
                       "Next-ViT-S is relatively faster here than in the paper" if measured < paper else
                       "Next-ViT-S is relatively slower here than in the paper")
            out.append(f"- **{backend}, {h}px, the headline pair** (Next-ViT-S / ResNet-101 latency; paper "
                       f"{paper:.2f}x): measured {measured:.2f}x, {verdict}.")
    return out + _precision_verdicts(d)


def _precision_verdicts(d: dict[str, Any]) -> list[str]:
    """Per backend and precision other than fp32: the speed-ups over fp32 of every model, in one sentence."""
    out = []
    h = d["config"]["image_size"][0]
    rows = [r for r in d["rows"] if r.get("speedup_vs_fp32")]
    for backend, precision in dict.fromkeys((r["backend"], r["precision"]) for r in rows):
        mine = [r for r in rows if r["backend"] == backend and r["precision"] == precision]
        text = ", ".join(f"{r['display']} {r['speedup_vs_fp32']:.2f}x" for r in mine)
        out.append(f"- **{backend}, {h}px, {precision} vs fp32** (batch {mine[0]['batch']}): {text}.")
    return out


def render_report(runs: list[dict[str, Any]], *, out_path: Path, sources: list[Path],
                  accuracy: dict[str, Any] | None = None) -> str:
    """The whole Markdown report for ``runs`` (bench JSON dicts), links relative to ``out_path``; ``accuracy``
    (``precision_table.load_accuracy``) fills the precision tables' digits top-1 drop column."""
    first = runs[0]["labels"]
    lines = [f"# Next-ViT speed tables reproduced on {first['cpu']} ({first['cores']} cores"
             + (f", {first['gpu']}" if first.get("gpu") else ", no GPU") + ")", "",
             "Generated by `benchmarks/report.py` from `nextvit-deploy bench` runs; regenerate with the commands "
             "in that script's docstring. Absolute milliseconds belong to this machine; the paper measured "
             "TensorRT 8.0.3 FP16 at batch 8 on a T4 GPU and Core ML on an iPhone 12 Pro Max, so the comparison "
             "is by ratios measured in one run (vs ResNet-101 and vs Next-ViT-S on the same backend) against "
             "the same ratios from the published numbers. `flip` marks an ordering that differs from the "
             f"paper; `flip~` one where the paper's ratio is within {int(TIE_BAND * 100)} % of 1. Published "
             "numbers and their provenance: `nextvit_deploy/resources/` (digitized rows carry about 0.1-0.2 ms "
             "reading error). Weights are random (speed does not depend on them); BatchNorms are folded.", ""]
    lines += ["## Where the paper's ordering holds on this machine", ""]
    for d in runs:
        lines += _verdicts(d)
    lines.append("")
    for d, src in zip(runs, sources):
        body = render_markdown(d, title=_section_title(d), accuracy=accuracy)
        lines.append(body)
        png = src.with_suffix(".png")
        if png.is_file():
            rel = os.path.relpath(png, out_path.parent)
            lines += [f"![accuracy vs latency, {d['config']['task']}]({rel})", ""]
        lines += [f"Source: `{os.path.relpath(src, out_path.parent)}`; wall time of the run "
                  f"{d.get('wall_s', 0):.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench.json files written by nextvit-deploy bench --out")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/README.md"),
                        help="Markdown file to write. Default: benchmarks/results/README.md")
    parser.add_argument("--accuracy", type=Path, default=None,
                        help="accuracy_digits_eval.json: the digits top-1 drop per precision for the precision tables")
    args = parser.parse_args(argv)
    accuracy = None
    if args.accuracy is not None:
        try:
            accuracy = load_accuracy(args.accuracy)
        except BadInput as exc:
            parser.error(f"--accuracy: {exc}")
    runs = []
    for path in args.runs:
        if not path.is_file():
            parser.error(f"{path} does not exist: run nextvit-deploy bench --out DIR first, then pass DIR/bench.json")
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            parser.error(f"{path} is not JSON: pass the bench.json that nextvit-deploy bench --out DIR wrote")
        if not isinstance(d, dict) or d.get("schema") not in SCHEMAS:
            schema = d.get("schema") if isinstance(d, dict) else None
            parser.error(f"{path} is not a bench report (schema {schema!r}): pass DIR/bench.json from bench --out DIR")
        runs.append(d)
    order = sorted(range(len(runs)), key=lambda i: runs[i]["config"]["task"] != "cls")
    runs, sources = [runs[i] for i in order], [args.runs[i] for i in order]
    text = render_report(runs, out_path=args.out, sources=sources, accuracy=accuracy)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(runs)} run(s): {', '.join(labels_line(d)[:60] + '...' for d in runs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
