"""The full-size parity jobs (Next-ViT-S at 224), run the way a user runs them: the installed ``nextvit-deploy``
command, export then verify, and the JSON report read back. They were steps of ``.ci/run`` and partly repeated
by other tests; here each runs once and CI gates it through the README's test command.

The verify tolerances are the project's targets: ONNX fp32 max_abs <= 1e-4 over the dynamic batch range, Core
ML fp16 cosine >= 0.9995 with top-5 overlap >= 4 (fp32: max_abs <= 1e-4), TensorRT-ready INT8 calibrated on
photos disjoint from verify's with cosine >= 0.98 on every gated case.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CLI = shutil.which("nextvit-deploy") or "nextvit-deploy"


def run(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode in ok, f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr
    return proc


def export_and_verify(out, artifact: str, *export_args: str, export_ok=(0,)) -> dict:
    run("export", *export_args, "--out", str(out), ok=export_ok)
    report = out / "parity.json"
    run("verify", str(out / artifact), "--json", str(report))
    data = json.loads(report.read_text())
    assert data["passed"] is True
    return data


def outputs(data: dict, prefix: str = "") -> list[dict]:
    """The outputs of the gated cases (those that decide the verdict) whose name starts with ``prefix``."""
    return [o for case in data["cases"] if case["gated"] and case["case"].startswith(prefix) for o in case["outputs"]]


def test_onnx_s_dynamic_batch_matches_pytorch(tmp_path):
    """The README's flow (issue #2's bar): batch 1 and 8 of a 1:8 profile, max_abs <= 1e-4, cosine >= 0.999999."""
    data = export_and_verify(tmp_path, "nextvit_small-onnx-fp32-224.onnx",
                             "--target", "onnx", "--variant", "nextvit_small", "--batch", "1:8")
    outs = outputs(data)
    assert outs and max(o["max_abs"] for o in outs) <= 1e-4 and min(o["cosine"] for o in outs) >= 0.999999
    assert {case["batch"] for case in data["cases"]} == {1, 8}  # both ends of the profile were run


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_coreml_s_meets_targets_through_the_evaluator(tmp_path, precision):
    data = export_and_verify(tmp_path, f"nextvit_small-coreml-{precision}-224.mlpackage",
                             "--target", "coreml", "--variant", "nextvit_small", "--precision", precision)
    photos = outputs(data, "photos")
    assert photos
    if precision == "fp32":
        assert max(o["max_abs"] for o in outputs(data)) <= 1e-4
    else:
        assert min(o["cosine"] for o in photos) >= 0.9995
        assert min(o["top5_overlap"] for o in photos) >= 4


def test_trt_ready_int8_calibrated_on_disjoint_photos(tmp_path):
    from nextvit_deploy.data import calibration_photos

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, image in enumerate(calibration_photos(64, 256)):
        pixels = (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(calib / f"calib_{i:02d}.png")
    # exit 2 where TensorRT is absent: the TensorRT-ready ONNX and its trtexec command were written
    data = export_and_verify(tmp_path / "trt", "nextvit_small-trt-int8-224.onnx", "--target", "trt",
                             "--precision", "int8", "--batch", "8", "--calib-dir", str(calib), export_ok=(0, 2))
    outs = outputs(data)
    assert outs and min(o["cosine"] for o in outs) >= 0.98
