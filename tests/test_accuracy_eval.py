"""Short version of benchmarks/accuracy_digits_eval.py: the digits-trained small Next-ViT through the real
``eval`` command (a child process) on 300 held-out PNGs; ONNX FP32 and INT8 (TensorRT Q/DQ, calibrated on
training PNGs) must stay within ``--max-drop 1.0`` of the PyTorch reference. About a minute of training."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed (provides the digits dataset)")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_digits_eval.py"


def _bench():
    spec = importlib.util.spec_from_file_location("accuracy_digits_eval", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_eval_gates_the_trained_digits_model():
    bench = _bench()
    res = bench.run(short=True, log=lambda _m: None, max_drop=1.0)
    assert not res["errors"], res["errors"]
    assert set(res["rows"]) == set(bench.SHORT_ARTIFACTS)
    for key, row in res["rows"].items():
        assert row["images"] == 300, key
        assert row["reference_top1"] >= 90.0, row  # the reference itself learned (fixed epoch count)
        assert row["exit_code"] == 0 and row["top1_drop"] <= 1.0, row  # --max-drop 1.0 held
        assert [s["file"] for s in row["skipped"]] == ["digit_3/corrupt.png"], row
    assert res["rows"]["onnx_fp32"]["top1_agreement"] == 100.0
