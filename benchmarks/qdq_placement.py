"""Q/DQ placement of our TensorRT-convention INT8 graph next to other quantizers', node by node.

Input: the fp32 ONNX that every quantizer started from, plus quantized graphs made from it elsewhere
(e.g. NVIDIA ModelOpt's ``python -m modelopt.onnx.quantization --quantize_mode int8`` output, run in a
throwaway environment; ModelOpt is never a dependency of this project) or by an older version of this
project. Our own graph is made here from the same fp32 file with the export's default options.

For every node of the fp32 graph it lists which inputs are fed by a DequantizeLinear in each quantized
graph (a renamed input is traced back through the DQ/Q pair to the original tensor), then prints the
per-op-type counts and every node whose placement differs, grouped by (op type, ours, theirs).

Run: ``python benchmarks/qdq_placement.py FP32.onnx --other modelopt=/path/modelopt_int8.onnx
--other before=/path/old_int8.onnx`` -> ``benchmarks/results/qdq_placement.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def placement(fp32, quantized) -> dict[str, tuple[int, ...]]:
    """Original node name -> indices of its inputs that a DequantizeLinear feeds in ``quantized``.

    Nodes are matched by name when the quantizer kept names, else by their (unchanged) output names.
    """
    producers = {o: n for n in quantized.graph.node for o in n.output}
    by_output = {n.output[0]: n for n in quantized.graph.node if n.output}
    by_name = {n.name: n for n in quantized.graph.node}
    out: dict[str, tuple[int, ...]] = {}
    for node in fp32.graph.node:
        q = by_name.get(node.name)
        if q is None or q.op_type != node.op_type:
            q = by_output.get(node.output[0])
        if q is None:
            continue
        fed = []
        for i, name in enumerate(q.input):
            p = producers.get(name)
            if p is not None and p.op_type == "DequantizeLinear":
                fed.append(i)
        out[node.name] = tuple(fed)
    return out


def counts(fp32, quantized) -> dict[str, int]:
    return {op: sum(n.op_type == op for n in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fp32", type=Path, help="the fp32 ONNX every quantized graph was made from")
    ap.add_argument("--other", action="append", default=[], help="NAME=PATH of another quantized graph")
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--note", action="append", default=[], help="a line saying how the other graphs were made")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import onnx

    from nextvit_deploy.data import calibration_photos, normalize
    from nextvit_deploy.export.int8 import Int8Options, model_with_names, quantize_trt

    fp32 = model_with_names(onnx.load(str(args.fp32)))
    size = fp32.graph.input[0].type.tensor_type.shape.dim[2].dim_value or 224
    ours = quantize_trt(fp32, normalize(calibration_photos(args.calib_images, size), MEAN, STD),
                        options=Int8Options(method="max", high_precision="fp32"))  # placement is the same with fp16
    graphs = {"ours": ours.model}
    for spec in args.other:
        name, _, path = spec.partition("=")
        graphs[name] = onnx.load(path)
    places = {k: placement(fp32, g) for k, g in graphs.items()}
    ops = {n.name: n.op_type for n in fp32.graph.node}
    lines = ["# Q/DQ placement, node by node", "",
             f"fp32 graph: `{args.fp32.name}` ({len(fp32.graph.node)} nodes). `ours` = `export --target trt "
             "--precision int8` placement (the same with FP16 or FP32 regions and every calibration method).", "",
             *[f"- {n}" for n in args.note], *([""] if args.note else []),
             "| graph | QuantizeLinear | DequantizeLinear |", "| --- | ---: | ---: |"]
    for k, g in graphs.items():
        c = counts(fp32, g)
        lines.append(f"| {k} | {c['QuantizeLinear']} | {c['DequantizeLinear']} |")
    lines += ["", "Nodes with a DQ-fed input, by op type and input index:", "",
              "| op type | nodes | " + " | ".join(graphs) + " |", "| --- | ---: |" + " --- |" * len(graphs)]
    for op in sorted(set(ops.values())):
        names = [n for n, o in ops.items() if o == op]
        cells = []
        for k in graphs:
            per_input = Counter(i for n in names for i in places[k].get(n, ()))
            cells.append(", ".join(f"in{i}: {c}" for i, c in sorted(per_input.items())) or "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {op} | {len(names)} | " + " | ".join(cells) + " |")
    report: dict[str, object] = {"counts": {k: counts(fp32, g) for k, g in graphs.items()}}
    for k in graphs:
        if k == "ours":
            continue
        groups: dict[tuple[str, tuple, tuple], list[str]] = defaultdict(list)
        for n, op in ops.items():
            a, b = places["ours"].get(n, ()), places[k].get(n, ())
            if a != b:
                groups[(op, a, b)].append(n)
        lines += ["", f"Differences, ours vs {k} (DQ-fed input indices):", "",
                  "| op type | ours | " + k + " | nodes | example |", "| --- | --- | --- | ---: | --- |"]
        for (op, a, b), names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {op} | {list(a) or '-'} | {list(b) or '-'} | {len(names)} | `{names[0]}` |")
        report[f"differences_vs_{k}"] = [{"op": op, "ours": list(a), k: list(b), "nodes": names}
                                         for (op, a, b), names in groups.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qdq_placement.md").write_text("\n".join(lines) + "\n")
    (args.out / "qdq_placement.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
