"""INT8 (TensorRT convention) of Next-ViT-S: parity on ``verify``'s photos by calibration source and method.

Calibration images never overlap the photos ``verify`` gates on (``nextvit_deploy.data.photos``). Sources:

* ``bundled``: the default, 64 views of the scikit-learn / scikit-image photos verify does not use;
* ``sklearn-crops``: a folder of 48 random crops of scikit-learn's two sample photos only (a narrow
  distribution: what a user with a small folder of their own photos might pass to ``--calib-dir``);
* ``bundled-16``: only 16 of the bundled views.

For each source and method (max, percentile, entropy) the fp32 deploy-form graph of Next-ViT-S (random
weights with realistic BatchNorm statistics, seed 0, opset 19, static batch 8) is quantized with the
export's transform and run on ONNX Runtime CPU next to the fp32 graph on verify's photo cases (12 photos
at batch 8, 8-bit pixels); the table gives the worst per-image cosine (verify gates INT8 at >= 0.98)
and the Q/DQ counts.

Run: ``python benchmarks/int8_calibration.py`` (about 10 minutes on 2 cores); writes
``benchmarks/results/int8_calibration.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma", "avx_vnni")))
    return f"{model}; {' '.join(keep)}"


def sklearn_crops(folder: Path, count: int = 48, seed: int = 0) -> Path:
    """``count`` random square crops (30-90 % of the shorter side, random mirror) of scikit-learn's photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    photos = [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    for i in range(count):
        img = photos[i % 2]
        h, w = img.shape[:2]
        k = int(min(h, w) * rng.uniform(0.3, 0.9))
        y, x = rng.integers(0, h - k + 1), rng.integers(0, w - k + 1)
        crop = img[y:y + k, x:x + k]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"crop_{i:03d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--methods", default="max,percentile,entropy")
    args = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort

    from nextvit_deploy.data import calibration_photos, load_image_dir, normalize, photos
    from nextvit_deploy.export.int8 import Int8Options, quantize_trt
    from nextvit_deploy.export.onnx import simplify_onnx, to_onnx
    from nextvit_deploy.fuse import fuse_model
    from nextvit_deploy.reference import build_model

    t0 = time.perf_counter()
    verify_x = normalize(np.rint(photos(12, 224) * 255.0) / 255.0, MEAN, STD)[:8]
    with tempfile.TemporaryDirectory(prefix="nextvit-int8cal-") as tmp:
        tmp_p = Path(tmp)
        fp32_path = tmp_p / "s.onnx"
        model = fuse_model(build_model("nextvit_small", seed=0)).model
        to_onnx(model, fp32_path, image_size=(224, 224), batch=8, dynamic_batch=False, opset=19,
                output_names=("logits",))
        fp32, _, _ = simplify_onnx(onnx.load(str(fp32_path)), check_feeds=[verify_x])
        sources = {
            "bundled": normalize(calibration_photos(64, 224), MEAN, STD),
            "bundled-16": normalize(calibration_photos(16, 224), MEAN, STD),
            "sklearn-crops": normalize(load_image_dir(sklearn_crops(tmp_p / "crops"), 224)[0], MEAN, STD),
        }
        opts = ort.SessionOptions()
        opts.log_severity_level = 3

        def run(m) -> np.ndarray:
            return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
                None, {"input": verify_x})[0].astype(np.float64)

        ref = run(fp32)
        rows = []
        for source, feeds in sources.items():
            for method in args.methods.split(","):
                res = quantize_trt(fp32, feeds, options=Int8Options(method=method))  # type: ignore[arg-type]
                out = run(res.model)
                cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
                top5 = np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) for a, b in zip(ref, out)])
                rows.append({"source": source, "images": int(feeds.shape[0]), "method": res.method,
                             "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                             "max_abs": float(np.abs(ref - out).max()), "top5_overlap": float(top5),
                             "qdq": res.extra["qdq_counts"], "passes_verify_gate": bool(cos.min() >= 0.98)})
                print(json.dumps(rows[-1]), flush=True)
    report = {"machine": cpu_flags(), "seconds": round(time.perf_counter() - t0), "rows": rows,
              "reference": "fp32 deploy-form graph on ONNX Runtime CPU (equal to PyTorch within 1e-5)",
              "model": "Next-ViT-S, random weights (seed 0) with realistic BatchNorm statistics, 224, static batch 8"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Next-ViT-S INT8 (TensorRT convention): parity on verify's photos by calibration source", "",
             f"{report['model']}; {report['reference']}. Machine: {report['machine']}. "
             f"Regenerate: `python benchmarks/int8_calibration.py` ({report['seconds']} s).", "",
             "| calibration source | images | method | min cosine | mean cosine | max abs | top-5 overlap | "
             "verify gate (>= 0.98) |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['images']} | {r['method']} | {r['min_cosine']:.4f} | "
                     f"{r['mean_cosine']:.4f} | {r['max_abs']:.3f} | {r['top5_overlap']:.2f} | "
                     f"{'pass' if r['passes_verify_gate'] else 'FAIL'} |")
    (args.out / "int8_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
