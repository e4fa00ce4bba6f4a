"""Benchmark: our deploy-form ONNX vs the official release's export recipe vs PyTorch eager (issue #2).

In one run on this machine, ONNX Runtime CPU latency (median of >= 20 timed runs after warm-up) at
batch 1 and 8 of:
  (a) ours: every BatchNorm folded (``fuse_model``), opset 17, onnxsim, dynamic batch;
  (b) the official recipe (``deployment/export_tensorrt_engine.py`` of the ByteDance release): only the
      blocks' ``merge_bn`` (pre-norm BNs merged into the following 1x1 conv / q, k, v), opset 13,
      onnx-simplifier with its defaults, static batch. The TorchScript exporter folds Conv->BN pairs by
      itself in eval mode, so what (b) keeps is what ``merge_bn`` leaves: the final BatchNorm and the
      stem's BatchNorms before the exporter's own folding;
  (c) PyTorch eager, fp32, the unfused model.

Usage:
    python benchmarks/export_recipes.py [--variant s] [--iters 20] [--threads 2] [--out benchmarks/results]
Prints medians and ratios and writes ``export_recipes.json`` / ``.md`` to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from nextvit_deploy.artifact import tool_versions
from nextvit_deploy.backends.onnxrt import OrtRunner
from nextvit_deploy.data import normalize, photos
from nextvit_deploy.export.onnx import graph_facts, simplify_onnx, to_onnx
from nextvit_deploy.fuse import fuse_model
from nextvit_deploy.latency import measure
from nextvit_deploy.reference import random_model


def official_recipe_model(model: torch.nn.Module) -> torch.nn.Module:
    """The official ``merge_bn``: NCB/NTB pre-norms only (their Conv->BN pairs fold in the exporter anyway)."""
    from nextvit_model.nextvit import NextConvBlock, NextTransformerBlock

    m = copy.deepcopy(model).eval()
    for module in m.modules():
        if isinstance(module, (NextConvBlock, NextTransformerBlock)):
            module.reparameterize()
    return m


def export_official(model: torch.nn.Module, path: Path, size: int, batch: int) -> dict:
    import onnxsim

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(batch, 3, size, size),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"])
    simplified, ok = onnxsim.simplify(onnx.load(str(path)))  # onnx-simplifier with its defaults
    assert ok, "onnxsim failed on the official recipe"
    onnx.save(simplified, str(path))
    return graph_facts(simplified)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="nextvit_small")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.variant, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = tmp / "ours.onnx"
        to_onnx(fuse_model(model).model, ours, image_size=(args.size, args.size), batch=8, dynamic_batch=True,
                opset=17, output_names=("logits",))
        feeds = [np.random.default_rng(0).standard_normal((b, 3, args.size, args.size), dtype=np.float32)
                 for b in (1, 8)]
        simplified, tool, _ = simplify_onnx(onnx.load(str(ours)), check_feeds=feeds[:1])
        onnx.save(simplified, str(ours))
        ours_facts = graph_facts(simplified)
        official = {}
        official_facts = {}
        for b in (1, 8):
            official[b] = tmp / f"official_b{b}.onnx"
            official_facts[b] = export_official(official_recipe_model(model), official[b], args.size, b)
        for batch in (1, 8):
            x = normalize(photos(batch, args.size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            with OrtRunner(ours, threads=args.threads, batch_range=(1, 8)) as r:
                a = measure(r, {"input": x}, warmup=args.warmup, iters=args.iters)
            with OrtRunner(official[batch], threads=args.threads) as r:
                b = measure(r, {"input": x}, warmup=args.warmup, iters=args.iters)
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                c = measure(lambda xt=xt: model(xt), warmup=args.warmup, iters=args.iters)
            rows.append({"batch": batch,
                         "ours_ms": a.median_ms, "official_ms": b.median_ms, "eager_ms": c.median_ms,
                         "ours_p90_ms": a.p90_ms, "official_p90_ms": b.p90_ms, "eager_p90_ms": c.p90_ms,
                         "official_over_ours": b.median_ms / a.median_ms, "eager_over_ours": c.median_ms / a.median_ms,
                         "noisy": [s.noisy for s in (a, b, c)]})
    result = {
        "variant": args.variant, "image_size": args.size, "threads": args.threads, "iters": args.iters,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{platform.platform()}",
        "versions": tool_versions("onnxsim"),
        "graphs": {"ours": {"nodes": ours_facts["nodes"], "batchnorm_nodes": ours_facts["batchnorm_nodes"],
                            "simplifier": tool},
                   "official": {"nodes": official_facts[8]["nodes"],
                                "batchnorm_nodes": official_facts[8]["batchnorm_nodes"]}},
        "rows": rows,
    }
    lines = [f"# Export recipes on ONNX Runtime CPU: {args.variant} at {args.size}x{args.size}", "",
             f"Machine: {result['machine']}. Median of {args.iters} timed runs after {args.warmup} warm-up runs, "
             f"per batch. Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.", "",
             f"Graphs: ours {ours_facts['nodes']} nodes / {ours_facts['batchnorm_nodes']} BatchNormalization; "
             f"official recipe {official_facts[8]['nodes']} nodes / {official_facts[8]['batchnorm_nodes']} "
             "BatchNormalization.", "",
             "| batch | (a) ours ms | (b) official recipe ms | (c) PyTorch eager ms | b/a | c/a |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['ours_ms']:.1f} | {r['official_ms']:.1f} | {r['eager_ms']:.1f} | "
                     f"{r['official_over_ours']:.2f} | {r['eager_over_ours']:.2f} |")
    lines.append("")
    lines.append("Reproduce: `python benchmarks/export_recipes.py --variant s --iters 20 --threads 2`")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_recipes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "export_recipes.md").write_text(text)


if __name__ == "__main__":
    main()
