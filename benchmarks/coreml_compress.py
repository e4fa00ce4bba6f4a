"""Compressed Core ML weights (issue #15, item 4): package sizes and Linux parity per compression.

For one variant and image size, exports the Core ML package with int8 weights (``--precision int8``) and with
8-, 6- and 4-bit palettized weights (``--precision fp16 --palettize-bits N``), each next to the dense fp16
package its manifest measures it against, and runs ``verify`` (the MIL evaluator against the PyTorch fp32
reference, photos and noise) on each. Random weights (seed 0) with realistic BatchNorm statistics: the
harshest case for weight rounding; accuracy on a trained model is ``accuracy_digits_eval.py --only
coreml_fp16,coreml_int8,coreml_pal8,coreml_pal6,coreml_pal4``.

Run: ``python benchmarks/coreml_compress.py [--variant nextvit_small] [--image-size 224] [--out DIR]``
(about 2 minutes a row for Next-ViT-S 224 on 2 cores). Prints a markdown table; writes
``DIR/coreml_compress.{json,md}`` only with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ROWS: dict[str, dict[str, Any]] = {
    "int8": {"precision": "int8"},
    "pal8": {"precision": "fp16", "palettize_bits": 8},
    "pal6": {"precision": "fp16", "palettize_bits": 6},
    "pal4": {"precision": "fp16", "palettize_bits": 4},
}


def run(variant: str, size: int, work: Path, *, depths: tuple[int, int, int, int] | None = None) -> list[dict[str, Any]]:
    from nextvit_deploy.export import ExportRequest, export
    from nextvit_deploy.verify import verify

    rows = []
    for key, fields in ROWS.items():
        print(f"export {key}", flush=True)
        started = time.perf_counter()
        art = export(ExportRequest(target="coreml", variant=variant, image_size=(size, size), out_dir=work, seed=0,
                                   depths=depths, force=True, **fields), progress=lambda m: print("  ", m, flush=True))
        export_s = time.perf_counter() - started
        print(f"verify {key}", flush=True)
        started = time.perf_counter()
        report = verify(art.path)
        worst = report.worst()
        rec = art.details["weight_compression"]
        rows.append({"row": key, "artifact": art.path.name, "export_s": round(export_s, 1),
                     "verify_s": round(time.perf_counter() - started, 1), "dense_mb": rec["package_bytes_dense"] / 1e6,
                     "mb": rec["package_bytes"] / 1e6, "ratio": rec["size_ratio"], "ops": rec["ops"],
                     "passed": bool(report), "min_cosine": worst["min_cosine"], "gate_cosine": report.tolerance.min_cosine,
                     "cases": {c.case: {"cosine": c.outputs[0].cosine, "top5": c.outputs[0].top5_overlap}
                               for c in report.cases}})
    return rows


def markdown(rows: list[dict[str, Any]], variant: str, size: int) -> str:
    lines = [f"# Core ML compressed weights: {variant} {size}x{size}, random weights (seed 0)", "",
             "| weights | package (MB) | of the fp16 package | worst cosine (photos, noise) | gate | verify |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        cos = ", ".join(f"{v['cosine']:.5f}" for v in r["cases"].values())
        lines.append(f"| {r['row']} ({', '.join(r['ops'])}) | {r['mb']:.1f} | {100 * r['ratio']:.0f}% (fp16: "
                     f"{r['dense_mb']:.1f} MB) | {cos} | {r['gate_cosine']} | {'pass' if r['passed'] else 'FAIL'} |")
    from nextvit_deploy.cpuinfo import cpu_flags

    lines += ["", f"CPU flags: {' '.join(cpu_flags()) or 'none'}. Parity by the MIL evaluator (fp32 accumulation)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="nextvit_small")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--depths", help="small test models only, e.g. 1,1,5,1")
    ap.add_argument("--out", type=Path, help="write coreml_compress.{json,md} here")
    args = ap.parse_args(argv)
    depths = tuple(int(d) for d in args.depths.split(",")) if args.depths else None
    with tempfile.TemporaryDirectory(prefix="nextvit-cmlc-") as tmp:
        rows = run(args.variant, args.image_size, Path(tmp), depths=depths)  # type: ignore[arg-type]
    text = markdown(rows, args.variant, args.image_size)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "coreml_compress.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "coreml_compress.md").write_text(text)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
