#!/usr/bin/env bash
# The main job: install, export Next-ViT-S to ONNX (dynamic batch 1..8), verify it against PyTorch,
# then print a latency table (fp32 and INT8 rows) next to the paper's published numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build}
python3 -m pip install -q -c constraints.txt -e ".[bench]"
nextvit-deploy export --target onnx --variant nextvit_small --batch 1:8 --out "$OUT"
nextvit-deploy verify "$OUT/nextvit_small-onnx-fp32-224.onnx" --json "$OUT/parity.json"
# ONNX Runtime only (the runtime of the graph exported above), fp32 and its INT8 rows: less CPU time than
# torch + ONNX Runtime without INT8 (measured: 1m37 vs 2m06 user time on 2 cores); add torch with --backends.
nextvit-deploy bench --batch 8 --models nextvit_small,resnet101 --backends onnxruntime --iters 10 --out "$OUT/bench"
