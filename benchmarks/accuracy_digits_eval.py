"""Accuracy of every precision and target through ``nextvit-deploy eval`` (issue #10, point 5).

Trains the small Next-ViT of ``accuracy_digits.py`` (depths (1, 1, 5, 1), scikit-learn digits at 32x32), saves
its weights as a checkpoint, writes the held-out split once as an ImageFolder of PNGs (one folder per digit),
exports it with ``nextvit_deploy.export`` to ONNX FP32, the TensorRT-ready FP16 graph, both INT8 conventions
(ONNX Runtime x86 and TensorRT Q/DQ, calibrated on a folder of *training* PNGs, never the evaluated ones) and
Core ML FP16/FP32, then runs the real ``eval`` command on each (a child process, under ``/usr/bin/time -v``
for peak RSS). The PyTorch FP32 row is eval's reference (rebuilt from the manifest, same pixels).

Memory: eval of the ONNX FP32 artifact on a 5,000-image folder (the test split repeated with 1-2 px shifts)
and on the first 500 of it (``--limit 500``); the peak RSS of both is reported: streaming keeps them level.

Run: ``python benchmarks/accuracy_digits_eval.py`` (a few CPU minutes) -> ``benchmarks/results/
accuracy_digits_eval.{json,md}``. ``--short`` (what ``tests/test_accuracy_eval.py`` gates): fewer images,
ONNX FP32 and INT8 TensorRT only, no memory run, nothing written unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import accuracy_digits as digits  # noqa: E402  (the training recipe lives there)

BATCH = 32
# (row label, export request fields); each becomes one eval run
ARTIFACTS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnx_fp32": ("ONNX FP32 (ONNX Runtime CPU)", {"target": "onnx", "precision": "fp32"}),
    "trt_fp16": ("FP16 TensorRT-ready graph (ONNX Runtime CPU)", {"target": "trt", "precision": "fp16"}),
    "onnx_int8": ("INT8 ONNX Runtime x86 convention", {"target": "onnx", "precision": "int8"}),
    "trt_int8": ("INT8 TensorRT convention Q/DQ (ONNX Runtime CPU)", {"target": "trt", "precision": "int8"}),
    "coreml_fp16": ("Core ML FP16 (ML Program evaluator)", {"target": "coreml", "precision": "fp16"}),
    "coreml_fp32": ("Core ML FP32 (ML Program evaluator)", {"target": "coreml", "precision": "fp32"}),
    "coreml_int8": ("Core ML INT8 weights, FP16 compute (ML Program evaluator)", {"target": "coreml", "precision": "int8"}),
    "coreml_pal8": ("Core ML 8-bit palettized weights, FP16 (ML Program evaluator)",
                    {"target": "coreml", "precision": "fp16", "palettize_bits": 8}),
    "coreml_pal6": ("Core ML 6-bit palettized weights, FP16 (ML Program evaluator)",
                    {"target": "coreml", "precision": "fp16", "palettize_bits": 6}),
    "coreml_pal4": ("Core ML 4-bit palettized weights, FP16 (ML Program evaluator)",
                    {"target": "coreml", "precision": "fp16", "palettize_bits": 4}),
}
SHORT_ARTIFACTS = ("onnx_fp32", "trt_int8")
REGENERATE = "python benchmarks/accuracy_digits_eval.py"


def _pixels(x_normalised: np.ndarray) -> np.ndarray:
    """accuracy_digits' normalised NCHW back to 8-bit HWC RGB (the pixels the model was trained on)."""
    from nextvit_model import IMAGENET_MEAN, IMAGENET_STD

    m = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return np.rint(np.clip(x_normalised * s + m, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, *, copies: int = 1,
                       limit: int | None = None) -> int:
    """One sub-folder per digit; ``copies`` > 1 repeats the split with small shifts. Returns the image count."""
    from PIL import Image

    for c in range(10):
        (root / f"digit_{c}").mkdir(parents=True, exist_ok=True)
    n = 0
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1), (2, 0), (0, 2), (-2, 0)]
    for k in range(copies):
        dy, dx = shifts[k % len(shifts)]
        for i, (img, y) in enumerate(zip(images, labels)):
            if limit is not None and n >= limit:
                return n
            Image.fromarray(np.roll(img, (dy, dx), axis=(0, 1))).save(root / f"digit_{y}" / f"{k:02d}_{i:04d}.png")
            n += 1
    return n


def export_all(checkpoint: Path, out: Path, calib_dir: Path, keys: tuple[str, ...], *,
               log: Callable[[str], None], errors: dict[str, str]) -> dict[str, Path]:
    from nextvit_deploy.errors import EngineNotBuilt
    from nextvit_deploy.export import ExportRequest, export

    paths = {}
    for key in keys:
        fields = ARTIFACTS[key][1]
        int8 = fields["precision"] == "int8" and fields["target"] != "coreml"  # Core ML int8 is weight-only
        batch = (BATCH,) * 3 if fields["target"] == "coreml" else (1, BATCH, 64)  # Core ML: a fixed batch
        req = ExportRequest(**fields, image_size=(digits.IMAGE_SIZE, digits.IMAGE_SIZE), batch=batch,
                            opset=19, out_dir=out / key, checkpoint=checkpoint, depths=digits.DEPTHS,
                            calib_dir=calib_dir if int8 else None, calib_images=256, simplify=False)
        log(f"export {key}")
        try:
            paths[key] = export(req).path
        except EngineNotBuilt as exc:  # no TensorRT here: the TensorRT-ready ONNX is what eval runs
            paths[key] = exc.artifact.path
        except Exception as exc:  # reported in the table instead of stopping the other rows
            log(f"export {key} failed: {type(exc).__name__}: {exc}")
            errors[key] = f"export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return paths


def run_eval(artifact: Path, data: Path, *, limit: int | None = None, max_drop: float | None = None,
             timeout: float = 3600) -> dict[str, Any]:
    """``nextvit-deploy eval`` in a child process (under /usr/bin/time -v when present): its JSON + peak RSS."""
    with tempfile.TemporaryDirectory(prefix="nextvit-eval-") as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-c", "from nextvit_deploy.cli import main; main()", "eval", str(artifact),
               "--data", str(data), "--batch", str(BATCH), "--json", str(out)]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        if max_drop is not None:
            cmd += ["--max-drop", f"{max_drop:g}"]
        timed = Path("/usr/bin/time").is_file()
        if timed:
            cmd = ["/usr/bin/time", "-v", *cmd]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "typings"),
                                                           os.environ.get("PYTHONPATH", "")]))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1) or not out.is_file():
            raise RuntimeError(f"eval of {artifact.name} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        result = json.loads(out.read_text())
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr) if timed else None
    result.update(exit_code=proc.returncode, wall_s=round(wall, 1),
                  peak_rss_mb=round(int(rss.group(1)) / 1024, 1) if rss else None)
    return result


def run(*, short: bool = False, work: Path | None = None, log: Callable[[str], None] = print,
        max_drop: float | None = None, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Train, write the folders, export, evaluate (the ``only`` rows, if given). Returns the results (nothing written)."""
    cfg = digits.SHORT if short else digits.FULL
    xtr, ytr, xte, yte = digits.digits_split()
    model, epochs, seconds = digits.train(xtr, ytr, cfg, log=log)
    keys = only or (SHORT_ARTIFACTS if short else tuple(ARTIFACTS))
    with tempfile.TemporaryDirectory(prefix="nextvit-digits-eval-") as tmp:
        w = Path(work or tmp)
        checkpoint = w / "digits_nextvit.pth"
        torch.save(model.state_dict(), checkpoint)
        test_dir, calib_dir = w / "test", w / "calib"
        n_test = write_image_folder(test_dir, _pixels(xte), yte, limit=300 if short else None)
        write_image_folder(calib_dir, _pixels(xtr), ytr)  # calibration: training images only
        (test_dir / "digit_3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        errors: dict[str, str] = {}
        paths = export_all(checkpoint, w / "artifacts", calib_dir, keys, log=log, errors=errors)
        rows = {}
        for key in keys:
            if key not in paths:
                continue
            log(f"eval {key}")
            try:
                rows[key] = run_eval(paths[key], test_dir, max_drop=max_drop)
            except RuntimeError as exc:
                errors[key] = " ".join(str(exc).split())[:300]
        memory = {}
        if not short and "onnx_fp32" in paths:
            big = w / "big"
            n_big = write_image_folder(big, _pixels(xte), yte, copies=10, limit=5000)
            for limit in (500, None):
                log(f"memory: eval onnx_fp32 on {limit or n_big} images")
                r = run_eval(paths["onnx_fp32"], big, limit=limit)
                memory[str(r["images"])] = {"peak_rss_mb": r["peak_rss_mb"], "images_per_s": r["images_per_s"],
                                            "wall_s": r["wall_s"]}
    import onnxruntime

    return {"test_images": n_test, "train_images": len(xtr), "epochs": epochs, "train_seconds": round(seconds, 1),
            "batch": BATCH, "rows": rows, "errors": errors, "memory": memory,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
                            "cpu_count": str(os.cpu_count()), "cpu_flags": _cpu_flags()}}


def _cpu_flags() -> str:
    from nextvit_deploy.cpuinfo import cpu_flags

    return " ".join(cpu_flags()) or "none"


def markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    first = next(iter(rows.values()))
    lines = ["# Accuracy through `nextvit-deploy eval`: small Next-ViT trained on scikit-learn digits", "",
             f"Regenerate: `{REGENERATE}` (writes this file and `accuracy_digits_eval.json`).", "",
             f"{first['images']} held-out test images as an ImageFolder of 32x32 PNGs (plus one corrupt PNG, "
             f"reported and skipped), {res['train_images']} training images, {res['epochs']} epochs "
             f"({res['train_seconds']:.0f} s). INT8 calibrated on a folder of training PNGs. Batch {res['batch']}. "
             "Preprocessing: the variant's timm eval transform (bicubic resize to 33, centre crop 32).", "",
             "| artifact | top-1 (%) | top-5 (%) | drop vs PyTorch (pt) | top-1 agreement (%) | images/s | skipped |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| PyTorch FP32 (eval's reference) | {first['reference_top1']:.2f} | {first['reference_top5']:.2f} | | | | |"]
    for key, r in rows.items():
        lines.append(f"| {ARTIFACTS[key][0]} | {r['candidate_top1']:.2f} | {r['candidate_top5']:.2f} | "
                     f"{r['top1_drop']:+.2f} | {r['top1_agreement']:.2f} | {r['images_per_s']:.0f} | "
                     f"{len(r['skipped'])} |")
    for key, why in res.get("errors", {}).items():
        lines.append(f"| {ARTIFACTS[key][0]} | not measured: {why} | | | | | |")
    if res["memory"]:
        lines += ["", "Peak RSS of `eval` (ONNX FP32, whole process incl. torch and the PyTorch reference, "
                      "`/usr/bin/time -v`):", "", "| images | peak RSS (MB) | images/s | wall (s) |",
                  "| ---: | ---: | ---: | ---: |"]
        for n, m in res["memory"].items():
            lines.append(f"| {n} | {m['peak_rss_mb']} | {m['images_per_s']:.0f} | {m['wall_s']} |")
    env = res["environment"]
    lines += ["", "images/s counts decoding, preprocessing and both models (artifact and PyTorch reference) on "
                  "shared cores: a throughput of this harness, not a speed claim for any runtime."]
    lines += ["", f"Machine: {env['machine']}, {env['cpu_count']} cores (shared), CPU flags {env['cpu_flags']}; "
                  f"Python {env['python']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="the gated short version (nothing written)")
    ap.add_argument("--work", type=Path, help="keep the folders and artifacts here")
    ap.add_argument("--only", help=f"comma-separated rows ({', '.join(ARTIFACTS)}); printed, nothing written")
    args = ap.parse_args(argv)
    only = tuple(k.strip() for k in args.only.split(",")) if args.only else None
    unknown = [k for k in only or () if k not in ARTIFACTS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}: choose from {', '.join(ARTIFACTS)}")
    res = run(short=args.short, work=args.work, only=only)
    text = markdown(res)
    print(text)
    if not args.short and only is None:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "accuracy_digits_eval.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        (RESULTS / "accuracy_digits_eval.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
