"""Benchmark: Core ML parity table, Next-ViT S/B/L x precision (issue #15's closing table).

For every variant x precision, at one image size (224 by default): export a Core ML package (classifier,
tensor input) with ``nextvit-deploy``'s exporter, run ``verify``'s gate through the MIL evaluator (Linux)
or Core ML (macOS), and measure agreement with the PyTorch fp32 reference on a separate image set. Per
row: the verify verdict, worst max |diff| and cosine over the gated cases, top-1 agreement and mean top-5
overlap on the agreement images, package size (MB), conversion and export time.

Precisions default to every precision the coreml target accepts (``TARGETS['coreml'].precisions``), so
``int8`` joins the table once the exporter accepts it; ``--precisions`` picks some. The MIL evaluator's fp16
arithmetic is ``--accumulate`` (fp32: fp16 storage with fp32 sums, the kinder bound; fp16: the harsher
one; both: a row per bound for fp16/int8 packages).

Usage:
    python benchmarks/coreml_parity.py [--variants s,b,l] [--precisions fp32,fp16] [--image-size 224]
        [--images 24] [--accumulate fp32|fp16|both] [--checkpoint s=PATH ...] [--seed 0]
        [--out benchmarks/results] [--keep DIR]

Rows already in ``--out``'s coreml_parity.json for other (variant, precision, size, accumulate) keys are
kept, so the table can be built one heavy run at a time. Measured: S fp32 + fp16 took 528 s on 2 shared
CPU cores (export ~50-70 s, verify + 24 agreement images through the MIL evaluator ~3 min per precision);
B and L scale with their parameters (~1.4x and ~1.9x S), so the whole table (3 variants x 3 precisions,
accumulate fp32) is about an hour there, less on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nextvit_deploy.artifact import tool_versions
from nextvit_deploy.cpuinfo import cpu_flags, cpu_name
from nextvit_deploy.data import calibration_photos, normalize, photos
from nextvit_deploy.export import ExportRequest, canonical_variant, export
from nextvit_deploy.targets import TARGETS, runner_for
from nextvit_deploy.verify import candidate_input, verify_artifact

NAME = "coreml_parity"


def say(msg: str) -> None:
    print(msg, flush=True)


def package_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return total / 2**20


def agreement_images(count: int, size: tuple[int, int]) -> np.ndarray:
    """The 12 scikit-image photos, then calibration views (other photos) up to ``count``; 8-bit pixels."""
    imgs = photos(min(count, 12), size)
    if count > 12:
        imgs = np.concatenate([imgs, calibration_photos(count - 12, size)])
    return np.rint(imgs * 255.0).astype(np.float32) / 255.0


def agreement(art, images: np.ndarray, *, accumulate: str) -> dict:
    """Top-1 agreement and mean top-5 overlap of the package against the PyTorch fp32 reference, image by image."""
    from nextvit_deploy.backends.torch import TorchRunner
    from nextvit_deploy.reference import reference_model

    pre = art.preprocessing
    ref_runner = TorchRunner(reference_model(art), output_names=art.output_names, name="reference")
    top1, top5, cos = [], [], []
    with ref_runner, runner_for(art, **_runner_options(accumulate)) as cand:
        for i in range(images.shape[0]):
            x = images[i:i + 1]
            ref = ref_runner.infer({"input": normalize(x, pre["mean"], pre["std"])})["logits"].astype(np.float64)
            got = cand.infer({art.input_name: candidate_input(x, art)})["logits"].astype(np.float64)
            r5, c5 = np.argsort(-ref[0])[:5], np.argsort(-got[0])[:5]
            top1.append(float(r5[0] == c5[0]))
            top5.append(len(set(r5) & set(c5)))
            cos.append(float(ref[0] @ got[0] / (np.linalg.norm(ref[0]) * np.linalg.norm(got[0]))))
            if (i + 1) % 8 == 0 or i + 1 == images.shape[0]:
                say(f"      agreement images {i + 1}/{images.shape[0]}")
    return {"images": int(images.shape[0]), "top1_agreement": float(np.mean(top1)),
            "top5_overlap_mean": float(np.mean(top5)), "top5_overlap_min": int(min(top5)),
            "logits_cosine_min": float(min(cos))}


def _runner_options(accumulate: str) -> dict:
    """The MIL evaluator's arithmetic off macOS; on macOS Core ML runs the package and picks its own."""
    return {} if sys.platform == "darwin" else {"accumulate": accumulate}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def run_row(variant: str, precision: str, size: tuple[int, int], args, out_dir: Path, accumulates: list[str]) -> list:
    checkpoint = args.checkpoints.get(variant)
    req = ExportRequest(target="coreml", precision=precision, variant=variant, image_size=size, out_dir=out_dir,
                        seed=args.seed, checkpoint=checkpoint, force=True)
    say("    exporting")
    started = time.perf_counter()
    art = export(req, progress=lambda m: say(f"      {m}"))
    export_s = time.perf_counter() - started
    size_mb = package_mb(art.path)
    rows = []
    images = agreement_images(args.images, size)
    for acc in accumulates if precision != "fp32" and sys.platform != "darwin" else ["fp32"]:
        say(f"    verifying (accumulate={acc})")
        started = time.perf_counter()
        report = verify_artifact(art, runner_options=_runner_options(acc), progress=lambda m: say(f"      {m}"))
        verify_s = time.perf_counter() - started
        worst = report.worst()
        say(f"    agreement on {images.shape[0]} images (accumulate={acc})")
        agree = agreement(art, images, accumulate=acc)
        row = {
            "variant": variant, "precision": precision, "image_size": f"{size[0]}x{size[1]}",
            "accumulate": acc if sys.platform != "darwin" else "Core ML",
            "weights": f"checkpoint {Path(str(checkpoint)).name} sha256 {str(art.checkpoint_sha256)[:12]}" if checkpoint
            else f"random (seed {args.seed}, realistic BatchNorm statistics)",
            "verify_passed": bool(report.passed), "failed_gates": worst["failed_gates"],
            "max_abs": worst["max_abs"], "cosine_min": worst["min_cosine"],
            "tolerance": {"atol": report.tolerance.atol, "rtol": report.tolerance.rtol,
                          "min_cosine": report.tolerance.min_cosine},
            **agree,
            "package_mb": round(size_mb, 2), "convert_s": art.details.get("convert_seconds"),
            "export_s": round(export_s, 1), "verify_s": round(verify_s, 1),
            "candidate_device": report.candidate_device, "ops": art.details.get("ops"),
            "commit": git_commit(),
        }
        say(f"    -> {'PASS' if row['verify_passed'] else 'FAIL'} max_abs {row['max_abs']:.3e} cosine "
            f"{row['cosine_min']:.7f} top-1 {row['top1_agreement']:.2f} top-5 {row['top5_overlap_mean']:.2f}/5 "
            f"{row['package_mb']:.1f} MB convert {row['convert_s']} s")
        rows.append(row)
    return rows


def write_md(path: Path, doc: dict) -> None:
    m = doc["machine"]
    lines = [
        "# Core ML parity: Next-ViT S/B/L x precision",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores; flags {', '.join(m['cpu_flags']) or 'none'}), {m['platform']}. "
        f"Tools: {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}.",
        "",
        "Each package is a classifier with a float32 tensor input. `verify` is the gate (photos and noise, "
        "max |diff| <= atol + rtol x max|ref| and cosine); top-1 / top-5 are measured on separate images "
        "(12 scikit-image photos, then calibration views) against PyTorch fp32. Off macOS the candidate is the "
        "MIL evaluator, not Core ML: `accumulate` fp32 is fp16 storage with fp32 sums (the kinder bound), fp16 "
        "the harsher one. With random weights the top logits are nearly tied, so top-1 is informative only.",
        "",
        "| variant | precision | size | accumulate | verify | max abs | cosine (min) | top-1 | top-5 (mean/min) "
        "| package MB | convert s | export s | weights |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['variant']} | {r['precision']} | {r['image_size']} | {r['accumulate']} | "
            f"{'pass' if r['verify_passed'] else 'FAIL ' + ','.join(r['failed_gates'])} | {r['max_abs']:.2e} | "
            f"{r['cosine_min']:.7f} | {r['top1_agreement']:.2f} | {r['top5_overlap_mean']:.2f}/{r['top5_overlap_min']} | "
            f"{r['package_mb']:.1f} | {r['convert_s']} | {r['export_s']} | {r['weights']} |")
    lines += ["", f"Command: `{doc['command']}`", ""]
    path.write_text("\n".join(lines))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="s,b,l", help="comma-separated: s,b,l (or full names)")
    ap.add_argument("--precisions", default=",".join(TARGETS["coreml"].precisions),
                    help=f"comma-separated; the coreml target accepts {','.join(TARGETS['coreml'].precisions)}")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=24, help="agreement images (top-1/top-5)")
    ap.add_argument("--accumulate", default="fp32", choices=("fp32", "fp16", "both"))
    ap.add_argument("--checkpoint", action="append", default=[], metavar="VARIANT=PATH",
                    help="trained weights for a variant (file or hf-hub:ORG/NAME); default random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--keep", type=Path, default=None, help="keep the packages in this folder")
    args = ap.parse_args(argv)
    try:
        args.variants = [canonical_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
        args.checkpoints = {}
        for item in args.checkpoint:
            key, sep, value = item.partition("=")
            if not sep or not value:
                ap.error(f"--checkpoint {item!r}: use VARIANT=PATH, e.g. s=nextvit_small.pth")
            args.checkpoints[canonical_variant(key.strip())] = value if value.startswith("hf-hub:") else Path(value)
    except Exception as exc:  # BadInput from canonical_variant: one line, naming this script's flags
        ap.error(str(exc).split(" (pass ")[0] + " (in --variants / --checkpoint)")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in TARGETS["coreml"].precisions]
    if bad:
        ap.error(f"--precisions {','.join(bad)} not accepted by the coreml target (it takes "
                 f"{','.join(TARGETS['coreml'].precisions)})")
    if args.images < 1:
        ap.error("--images must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    size = (args.image_size, args.image_size)
    accumulates = ["fp32", "fp16"] if args.accumulate == "both" else [args.accumulate]
    out_json = args.out / f"{NAME}.json"
    old = json.loads(out_json.read_text()).get("rows", []) if out_json.exists() else []
    jobs = [(v, p) for v in args.variants for p in args.precisions]
    rows = []
    t0 = time.perf_counter()
    for i, (variant, precision) in enumerate(jobs, 1):
        say(f"[{i}/{len(jobs)}] {variant} {precision} {size[0]}x{size[1]} ({time.perf_counter() - t0:.0f} s so far)")
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            rows += run_row(variant, precision, size, args, args.keep, accumulates)
        else:
            with tempfile.TemporaryDirectory(prefix="coreml-parity-") as tmp:  # packages are 40-800 MB each
                rows += run_row(variant, precision, size, args, Path(tmp), accumulates)
    key = ("variant", "precision", "image_size", "accumulate")
    new_keys = {tuple(r[k] for k in key) for r in rows}
    order = {v: i for i, v in enumerate(("nextvit_small", "nextvit_base", "nextvit_large"))}
    merged = [r for r in old if tuple(r.get(k) for k in key) not in new_keys] + rows
    prec = {p: i for i, p in enumerate(("fp32", "fp16", "int8"))}
    merged.sort(key=lambda r: (order.get(r["variant"], 9), r["image_size"], prec.get(r["precision"], 9), r["accumulate"]))
    doc = {
        "benchmark": NAME,
        "command": " ".join(["python", "benchmarks/coreml_parity.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_name(), "cpu_flags": list(cpu_flags()), "cores": os.cpu_count(),
                    "platform": platform.platform()},
        "versions": tool_versions("coremltools", "numpy"),
        "rows": merged,
        "elapsed_s_this_run": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    write_md(args.out / f"{NAME}.md", doc)
    say(f"wrote {out_json} and {args.out / (NAME + '.md')} ({len(rows)} new rows, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
