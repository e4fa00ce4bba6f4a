"""CPU INT8 speed of Next-ViT on ONNX Runtime: FP32 vs INT8 latency at batch 1 and 8, and where the INT8
graph's time goes by operator type (ONNX Runtime's profiler).

Both graphs come from ``export`` (``--target onnx``, dynamic batch 1..8, INT8 calibrated on the bundled
calibration photos, weight bits from this CPU's flags unless ``--weight-bits``). Latencies are medians
over interleaved rounds (fp32 b1, int8 b1, fp32 b8, int8 b8, fp32 b1, ...) so drift hits both alike; the
profile is one profiled session of the INT8 graph at batch 8 (node events summed per operator type). The
audit (``nextvit_deploy.export.qdq_passes.audit``) counts what survives ONNX Runtime's QDQ fusion: Q/DQ
nodes, DequantizeLinear -> QuantizeLinear pairs and float islands. ``--compare-ops Conv,Gemm,MatMul`` adds
an INT8 graph quantized with only those operator types (same calibration) to the interleaved rounds.

Run: ``python benchmarks/int8_speed.py [--variant nextvit_small] [--rounds 5] [--compare-ops Conv,Gemm,MatMul]``;
writes ``benchmarks/results/int8_speed.{json,md}`` (or ``--out DIR``). The machine's load average is recorded
(shared machines drift).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

RESULTS = Path(__file__).resolve().parent / "results"


def op_profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 5) -> dict[str, float]:
    """Share of node time per operator type in ``runs`` profiled runs (ONNX Runtime's profiler)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads = threads
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_op[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0)
    total = sum(per_op.values()) or 1
    return {op: round(100 * us / total, 1) for op, us in per_op.most_common()}


def per_round(timings, precision: str, batch: int) -> list[float]:
    """FP32 / ``precision`` latency ratio of every interleaved round at ``batch``."""
    return [round(f / i, 3) for f, i in zip(timings[f"fp32 b{batch}"].round_medians_ms,
                                            timings[f"{precision} b{batch}"].round_medians_ms)]


def summarize(report: dict) -> dict:
    """The audit's numbers that explain INT8 time: Q/DQ left after fusion, DQ -> Q pairs, float islands."""
    run = report["ort_cpu"]
    ops = run["ops"]
    return {"quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "dq_q_pairs": run["dq_q_pairs"], "dq_q_pairs_same_scale": run["dq_q_pairs_same_scale"],
            "float_islands": run["float_islands"],
            "fused": {op: c for op, c in ops.items() if op.startswith(("QLinear", "QGemm", "MatMulInteger"))}}


def describe(a: dict) -> str:
    islands = ", ".join(f"{op} {c}" for op, c in a["float_islands"].items()) or "none"
    fused = ", ".join(f"{op} {c}" for op, c in a["fused"].items())
    return (f"{a['quantize_linear']} QuantizeLinear, {a['dequantize_linear']} DequantizeLinear, {a['dq_q_pairs']} DQ->Q "
            f"pairs, float islands: {islands}; fused: {fused}")


def compare_graph(fp32: Path, dst: Path, args, op_types: tuple[str, ...]) -> Path:
    """The INT8 graph ``export`` would write, quantizing only ``op_types`` (same calibration images and bits)."""
    from nextvit_deploy.cpuinfo import int8_weight_bits
    from nextvit_deploy.export.int8 import quantize_ort_x86
    from nextvit_deploy.export.precision import calibration_set
    from nextvit_model import resolve_variant

    cfg = resolve_variant(args.variant)
    calib = calibration_set(image_size=(args.image_size, args.image_size), calib_dir=None, calib_images=args.calib_images,
                            crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std, input_kind="tensor")
    bits = args.weight_bits or int8_weight_bits()
    res = quantize_ort_x86(onnx.load(str(fp32)), calib.feeds, reduce_range=bits == 7, op_types=op_types)
    onnx.save(res.model, str(dst))
    print(f"quantized {','.join(op_types)} only ({bits}-bit weights)", flush=True)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="nextvit_small")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=4, help="timed runs per graph and batch per round")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--weight-bits", type=int, choices=(7, 8), default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--compare-ops", default=None, help="also time an INT8 graph quantizing only these op types "
                    "(comma-separated, e.g. Conv,Gemm,MatMul: the graph before Relu/Add were quantized)")
    args = ap.parse_args()

    from nextvit_deploy.backends.onnxrt import OrtRunner
    from nextvit_deploy.bench.measure import Timed, interleave
    from nextvit_deploy.cpuinfo import cpu_flags, cpu_name, int8_weight_bits
    from nextvit_deploy.export import ExportRequest, export
    from nextvit_deploy.export.qdq_passes import audit

    size = (args.image_size, args.image_size)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="int8-speed-") as tmp:
        arts = {}
        for precision in ("fp32", "int8"):
            t0 = time.perf_counter()
            arts[precision] = export(ExportRequest(
                precision=precision, variant=args.variant, image_size=size, batch=(1, 8, 8), out_dir=Path(tmp),
                calib_images=args.calib_images, int8_weight_bits=args.weight_bits if precision == "int8" else None))
            print(f"exported {precision} in {time.perf_counter() - t0:.0f} s", flush=True)
        paths = {p: a.path for p, a in arts.items()}
        present = {n.op_type for n in onnx.load(str(arts["fp32"].path), load_external_data=False).graph.node}
        unknown = [op for op in (args.compare_ops or "").split(",") if op and op not in present]
        if unknown:
            ap.error(f"--compare-ops: {', '.join(unknown)} not in the graph; it has {', '.join(sorted(present))}")
        if args.compare_ops:
            paths["int8 " + args.compare_ops.replace(",", "/")] = compare_graph(
                arts["fp32"].path, Path(tmp) / "int8-compare.onnx", args, tuple(args.compare_ops.split(",")))
        precisions = list(paths)
        audits = {p: summarize(audit(onnx.load(str(paths[p])))) for p in precisions if p != "fp32"}
        for p, a in audits.items():
            print(f"{p}: {a}", flush=True)
        rng = np.random.default_rng(0)
        feeds = {b: {"input": rng.standard_normal((b, 3, *size), dtype=np.float32)} for b in (1, 8)}
        runners = {p: OrtRunner(path, threads=args.threads, batch_range=(1, 8)) for p, path in paths.items()}
        for r in runners.values():
            r.__enter__()
        items = [Timed(f"{p} b{b}", runners[p], feeds[b]) for b in (1, 8) for p in precisions]
        timings = interleave(items, warmup=2, iters=args.rounds * args.runs, rounds=args.rounds, duration_s=None,
                             step=lambda d, _n: print(d, flush=True))
        profile = op_profile(arts["int8"].path, feeds[8], args.threads)
        fp32_profile = op_profile(arts["fp32"].path, feeds[8], args.threads)
        arts_details = arts["int8"].details["precision_transform"]
        weight_bits = arts_details.get("weight_bits")
    med = {k: v.stats.median_ms for k, v in timings.items()}
    result = {
        "variant": args.variant, "image_size": size, "threads": args.threads, "cpu": cpu_name(),
        "cpu_flags": list(cpu_flags()), "detected_weight_bits": int8_weight_bits(), "weight_bits": weight_bits,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()], "rounds": args.rounds,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "speedup": {f"b{b}": round(med[f"fp32 b{b}"] / med[f"int8 b{b}"], 3) for b in (1, 8)},
        "speedup_per_round": {f"b{b}": per_round(timings, "int8", b) for b in (1, 8)},
        "int8_op_profile_pct": profile, "fp32_op_profile_pct": fp32_profile,
        "int8_op_types": arts_details.get("op_types"), "audit": audits,
    }
    if args.compare_ops:
        other = precisions[-1]
        result["compare"] = {"precision": other, "speedup": {f"b{b}": round(med[f"fp32 b{b}"] / med[f"{other} b{b}"], 3)
                                                             for b in (1, 8)},
                             "speedup_per_round": {f"b{b}": per_round(timings, other, b) for b in (1, 8)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ONNX Runtime CPU INT8 vs FP32: {args.variant} at {size[0]}x{size[1]}", "",
             f"{result['cpu']}, flags {', '.join(result['cpu_flags'])}, {args.threads} threads, weight bits "
             f"{weight_bits}; load average before {result['load_average_before']}, after "
             f"{result['load_average_after']}; {args.rounds} interleaved rounds of {args.runs} runs.", "",
             "| batch | FP32 median ms | INT8 median ms | speed-up | per-round speed-ups |", "|---:|---:|---:|---:|---|"]
    for b in (1, 8):
        lines.append(f"| {b} | {med[f'fp32 b{b}']:.1f} | {med[f'int8 b{b}']:.1f} | {result['speedup'][f'b{b}']:.2f}x "
                     f"| {', '.join(map(str, result['speedup_per_round'][f'b{b}']))} |")
    if args.compare_ops:
        c = result["compare"]
        for b in (1, 8):
            lines.append(f"| {b} ({c['precision']}) | {med[f'fp32 b{b}']:.1f} | {med[c['precision'] + f' b{b}']:.1f} "
                         f"| {c['speedup'][f'b{b}']:.2f}x | {', '.join(map(str, c['speedup_per_round'][f'b{b}']))} |")
    lines += ["", "What ONNX Runtime CPU runs (extended optimizations, `qdq_passes.audit`): "
              + "; ".join(f"{p}: {describe(a)}" for p, a in audits.items()) + "."]
    lines += ["", "INT8 graph, batch 8, share of node time by operator type (ONNX Runtime profiler): "
              + ", ".join(f"{op} {pct} %" for op, pct in list(profile.items())[:10]) + ".",
              "", "FP32 graph, same: " + ", ".join(f"{op} {pct} %" for op, pct in list(fp32_profile.items())[:8]) + "."]
    (args.out / "int8_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for b in ("b1", "b8"):
        print(f"median of per-round speed-ups {b}: {statistics.median(result['speedup_per_round'][b]):.2f}")


if __name__ == "__main__":
    main()
