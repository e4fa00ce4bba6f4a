"""Short version of benchmarks/accuracy_digits.py: a small Next-ViT trained on scikit-learn digits; the FP16
graph and the TensorRT-style INT8 graph must keep its held-out top-1 (drops <= 0.1 pt and <= 1.0 pt)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_digits.py"


def _bench():
    spec = importlib.util.spec_from_file_location("accuracy_digits", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_trained_digits_precision_drops():
    bench = _bench()
    table = bench.run(bench.SHORT, speed_iters=2, variants=bench.SHORT_VARIANTS, log=lambda _m: None)
    # fixed epoch count (never cut short by a busy machine): the reference itself must have learned
    assert table.top1["fp32_torch"] >= 90.0, table.to_dict()
    assert table.drop_pt["fp16_graph"] <= bench.TARGET_DROP_PT["fp16"], table.to_dict()
    assert table.drop_pt["int8_trt"] <= bench.TARGET_DROP_PT["int8"], table.to_dict()
    assert table.drop_pt["int8_ort"] <= bench.TARGET_DROP_PT["int8"], table.to_dict()
    assert table.int8_trt["trt_compat"]["int8_trt"]["passed"]
