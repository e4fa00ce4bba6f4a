#!/usr/bin/env bash
# The main job: install, export Next-ViT-S to ONNX (dynamic batch 1..8), verify it against PyTorch,
# then print a latency table next to the paper's published numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build}
python3 -m pip install -q -c constraints.txt -e ".[bench]"
nextvit-deploy export --target onnx --variant nextvit_small --batch 1:8 --out "$OUT"
nextvit-deploy verify "$OUT/nextvit_small-onnx-fp32-224.onnx" --json "$OUT/parity.json"
nextvit-deploy bench --batch 8 --models nextvit_small,resnet101 --iters 10 --out "$OUT/bench"
