"""The Core ML FP16 overflow guard (export/coreml_fp16.py) on a Next-ViT built to overflow fp16.

The model: the small test Next-ViT (depths (1, 1, 5, 1)) with the q and k projections of its last
E-MHSA scaled up, so that ``q @ k^T`` (formed before the 1/sqrt(d) scale) exceeds fp16's 65504 on
real photos while everything else is unchanged (the softmax absorbs the scale). Exported at 64x64:

* fp16 without calibration (static rules only): the evaluator's fp16 program produces inf/NaN and
  ``verify`` fails;
* fp16 with calibration (bundled calibration photos, which ``verify`` never uses): that attention's
  matmul stays fp32, named in the keep-list, and ``verify`` passes.

Those two exports take a minute on 2 cores (slow tier). The fast tests run the same guard functions on a
one-head attention module converted directly (seconds), calibrated on other random inputs than it is
checked on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_DEPTHS, photo_batch, requires

pytestmark = requires("coremltools")

SIZE = (64, 64)
ATTENTION = "stages.3.blocks.0.e_mhsa"  # the last E-MHSA (stage 4, 2x2 tokens at 64x64)
GAIN = 200.0  # q and k scaled by this: logits grow by GAIN**2 = 40000


def _attention_logit_max(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Largest |q @ k^T| (before the scale) of ATTENTION on ``images``, in fp32 PyTorch."""
    attn = model.get_submodule(ATTENTION)
    seen: list[float] = []

    def hook(mod, args):
        x = args[0]
        b = x.shape[0]
        q = mod._heads(mod.q(x), b)
        k = mod._heads(mod.k(x if mod.sr is None else mod.norm(mod.sr(x.transpose(1, 2))).transpose(1, 2)), b)
        seen.append(float((q @ k.transpose(-2, -1)).abs().max()))

    handle = attn.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(images)
    handle.remove()
    return max(seen)


@pytest.fixture(scope="module")
def overflow_checkpoint(tmp_path_factory) -> Path:
    from nextvit_deploy.reference import random_model

    model = random_model("nextvit_small", seed=1, depths=SMALL_DEPTHS).eval()
    photos = photo_batch(4, SIZE[0])
    assert _attention_logit_max(model, photos) < 1000  # as built: far from fp16's range
    attn = model.get_submodule(ATTENTION)
    with torch.no_grad():
        for lin in (attn.q, attn.k):
            lin.weight.mul_(GAIN)
            lin.bias.mul_(GAIN)
    assert _attention_logit_max(model, photos) > 4 * 65504  # now overflows fp16 on the verify photos
    path = tmp_path_factory.mktemp("ckpt") / "overflow.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coreml_fp16")


def _export(out: Path, ckpt: Path, **kw):
    from nextvit_deploy.export import ExportRequest, export

    return export(ExportRequest(target="coreml", precision="fp16", variant="nextvit_small", image_size=SIZE,
                                out_dir=out, depths=SMALL_DEPTHS, checkpoint=ckpt, **kw))


def _program_output(art) -> np.ndarray:
    from nextvit_deploy.backends.coreml_mil import MilEvaluator
    from nextvit_deploy.data import normalize, photos

    ev = MilEvaluator.from_package(art.path)
    x = normalize(photos(1, SIZE[0]), art.preprocessing["mean"], art.preprocessing["std"])
    return ev.run({"input": x})["logits"]


class TinyAttention(torch.nn.Module):
    """One attention head whose q @ k^T reaches ~1e5 on N(0, 1) tokens (GAIN-scaled projections)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        with torch.no_grad():
            for lin in (self.q, self.k):
                lin.weight.mul_(GAIN)
        self.scale = dim ** -0.5

    def forward(self, x):
        attn = (self.q(x) @ self.k(x).transpose(-2, -1)) * self.scale
        return attn.softmax(dim=-1) @ self.v(x)


def _tiny_convert(tmp: Path, compute_precision, name: str):
    """``TinyAttention`` as an ML Program (``name`` = "milinternal" gives the in-memory program)."""
    import coremltools as ct

    from nextvit_deploy.export.coreml import _quiet_conversion, conversion_pipeline

    x = torch.randn(1, 8, 16)
    traced = torch.jit.trace(TinyAttention().eval(), x)
    with _quiet_conversion():
        model = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=x.shape, dtype=np.float32)],
                           outputs=[ct.TensorType(name="out", dtype=np.float32)],
                           convert_to="milinternal" if name == "milinternal" else "mlprogram",
                           compute_precision=compute_precision, minimum_deployment_target=ct.target.iOS16,
                           pass_pipeline=conversion_pipeline(ct), skip_model_load=True)
    if name == "milinternal":
        return model
    path = tmp / f"{name}.mlpackage"
    model.save(str(path))
    return path


def test_guard_functions_keep_the_overflowing_matmul_of_a_tiny_attention(tmp_path):
    import coremltools as ct

    from nextvit_deploy.backends.coreml_mil import MilEvaluator, load_program
    from nextvit_deploy.export.coreml_fp16 import CoreMLFp16Plan, choose_fp32_ops, measure_program
    from nextvit_deploy.export.fp16 import Fp16Policy

    rng = np.random.default_rng(1)
    calib = rng.standard_normal((6, 8, 16)).astype(np.float32)  # calibration inputs ...
    check = rng.standard_normal((1, 8, 16)).astype(np.float32)  # ... and another one to check on
    program = _tiny_convert(tmp_path, ct.precision.FLOAT32, "milinternal")
    ranges = measure_program(program, calib, batch=1)
    matmuls = [op for op in program.functions["main"].operations if op.op_type == "matmul"]
    logits = ranges[matmuls[0].outputs[0].name].absmax
    assert 65504 < logits < 1e7  # q @ k^T overflows fp16, and it is finite in fp32
    kept = choose_fp32_ops(program, ranges)
    assert kept[0].node == matmuls[0].name and kept[0].reason.startswith("overflow:")
    assert {k.op_type for k in kept} == {"matmul", "mul", "softmax"}  # the product, its scale, the softmax
    assert all(k.node != matmuls[1].name for k in kept)  # attn @ v reads probabilities: fp16 is fine
    # a looser margin moves the limit, and fewer ops are kept (the thresholds are really read)
    assert len(choose_fp32_ops(program, ranges, policy=Fp16Policy(margin=1e-3))) < len(kept)

    torch_out = TinyAttention().eval()(torch.from_numpy(check)).detach().numpy()
    plain = MilEvaluator.from_package(_tiny_convert(tmp_path, ct.precision.FLOAT16, "plain"))
    assert not np.isfinite(plain.run({"input": check})["out"]).all()  # unguarded fp16: inf/NaN
    plan = CoreMLFp16Plan(planned=kept, policy=Fp16Policy(), calibration={"images": 6}, ranges_summary={})
    guarded_path = _tiny_convert(tmp_path, plan.compute_precision(ct), "guarded")
    details = plan.details(load_program(guarded_path))
    assert details["fp32_kept_count"] == 3 == details["fp32_ops"] and details["fp32_not_applied"] == []
    assert details["fp16_ops"] >= 4  # q, k, v projections and attn @ v stay fp16
    for accumulate in ("fp32", "fp16"):  # the evaluator runs the mixed program at both fp16 bounds
        out = MilEvaluator.from_package(guarded_path, accumulate=accumulate).run({"input": check})["out"]
        assert np.isfinite(out).all()
        assert np.abs(out - torch_out).max() <= 2e-2 * np.abs(torch_out).max()


def _static_package(tmp: Path, edit) -> dict:
    """TinyAttention with ``edit`` applied to its v projection, converted with a guard that measured nothing."""
    import coremltools as ct

    from nextvit_deploy.backends.coreml_mil import load_program
    from nextvit_deploy.export.coreml import _quiet_conversion, conversion_pipeline
    from nextvit_deploy.export.coreml_fp16 import CoreMLFp16Plan
    from nextvit_deploy.export.fp16 import Fp16Policy

    tiny = TinyAttention().eval()
    with torch.no_grad():
        edit(tiny.v.weight)
    plan = CoreMLFp16Plan(planned=[], policy=Fp16Policy(), calibration=None, ranges_summary={})
    x = torch.randn(1, 8, 16)
    with _quiet_conversion():
        model = ct.convert(torch.jit.trace(tiny, x), inputs=[ct.TensorType(name="input", shape=x.shape, dtype=np.float32)],
                           convert_to="mlprogram", compute_precision=plan.compute_precision(ct),
                           minimum_deployment_target=ct.target.iOS16, pass_pipeline=conversion_pipeline(ct),
                           skip_model_load=True)
    path = tmp / f"static{len(list(tmp.iterdir()))}.mlpackage"
    model.save(str(path))
    return plan.details(load_program(path))


def test_static_rules_without_calibration(tmp_path):
    """Without calibration only constants decide: weights mostly below fp16's normal range keep their op
    (our rule, decided in the selector); a weight beyond 65504 is kept by coremltools itself and reported too."""
    tiny = _static_package(tmp_path, lambda w: w.mul_(1e-6))
    assert [k["op_type"] for k in tiny["fp32_kept"]] == ["linear"]
    assert "below fp16's smallest normal" in tiny["fp32_kept"][0]["reason"]
    assert tiny["ranges_measured"] is False and tiny["fp32_ops"] == 1

    big = _static_package(tmp_path, lambda w: w.__setitem__((0, 0), 1e5))
    assert [k["op_type"] for k in big["fp32_kept"]] == ["linear"] and big["fp32_ops"] == 1
    assert "coremltools' own fp16 rules" in big["fp32_kept"][0]["reason"]

    plain = _static_package(tmp_path, lambda w: w.mul_(1.0))
    assert plain["fp32_kept"] == [] and plain["fp32_ops"] == 0 and plain["fp16_ops"] >= 5


@pytest.mark.slow
def test_unguarded_fp16_package_overflows(out_dir, overflow_checkpoint):
    from nextvit_deploy.verify import verify

    art = _export(out_dir / "static", overflow_checkpoint)
    pt = art.details["precision_transform"]
    assert pt["ranges_measured"] is False and "no activation ranges measured" in pt["ranges"]["note"]
    assert not any(k["op_type"] == "matmul" for k in pt["fp32_kept"])
    assert pt["policy"]["activation_max"] == pytest.approx(65504 / 4)
    assert not np.isfinite(_program_output(art)).all()
    assert not verify(art.path)


@pytest.mark.slow
def test_guarded_fp16_package_keeps_the_attention_matmul_and_verifies(out_dir, overflow_checkpoint):
    from nextvit_deploy.backends.coreml_mil import load_program
    from nextvit_deploy.export.coreml_fp16 import program_precision
    from nextvit_deploy.verify import verify

    messages: list[str] = []
    from nextvit_deploy.export import ExportRequest, export

    art = export(ExportRequest(target="coreml", precision="fp16", variant="nextvit_small", image_size=SIZE,
                               out_dir=out_dir / "guarded", depths=SMALL_DEPTHS, checkpoint=overflow_checkpoint,
                               calibrate_fp16=True, calib_images=4), progress=messages.append)
    pt = art.details["precision_transform"]
    assert pt["ranges_measured"] is True and pt["calibration"]["images"] == 4
    assert "bundled calibration photos" in pt["calibration"]["source"]
    overflow = [k for k in pt["fp32_kept"] if k["reason"].startswith("overflow:")]
    assert any(k["op_type"] == "matmul" for k in overflow), pt["fp32_kept"]
    assert set(pt["fp32_kept"][0]) == {"node", "op_type", "reason"}  # the TensorRT keep-list's shape
    assert pt["ranges"]["largest_activations"][0]["absmax"] > 65504
    # the package really computes those ops in fp32 and everything else stays fp16
    ops = program_precision(load_program(art.path))
    assert all(ops[k["node"]]["dtype"] == "fp32" for k in pt["fp32_kept"])
    assert pt["fp16_ops"] > 10 * pt["fp32_ops"] > 0 and pt["fp32_not_applied"] == []
    assert sum(o["dtype"] == "fp32" for o in ops.values()) == pt["fp32_ops"] == pt["fp32_kept_count"]
    assert any(m.startswith("fp32 kept: ") and "matmul" in m for m in messages)
    assert np.isfinite(_program_output(art)).all()
    report = verify(art.path)
    assert report, report.to_dict()["worst"]


# command line: the calibration flags reach the Core ML fp16 guard; bad input is one line, exit 2 -------------

def _one_line_error(args: list[str], pattern: str) -> None:
    import re

    from typer.testing import CliRunner

    from nextvit_deploy.cli import app

    result = CliRunner().invoke(app, ["export", "--target", "coreml", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


@pytest.mark.parametrize("args,pattern", [
    (["--precision", "fp32", "--calib-images", "8"], r"or --precision fp16 with --target coreml, not fp32 coreml: "
                                                     r"drop --calib-images"),
    (["--precision", "fp16", "--calib-images", "0"], r"--calib-images must be at least 1, got 0"),
    (["--precision", "fp16", "--calib-dir", "no-such-dir"], r"no-such-dir"),
    (["--precision", "fp16", "--calib-dir", "{few}"], r"has 2 usable images: add at least \d+, or pass "
                                                      r"--calib-images 2"),
])
def test_cli_bad_calibration_input_is_one_line(tmp_path, args, pattern):
    from PIL import Image

    few = tmp_path / "few"
    few.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(few / f"{i}.png")
    out = tmp_path / "out"
    _one_line_error(["-o", str(out), "--image-size", "64", *[a.replace("{few}", str(few)) for a in args]], pattern)
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [([], False), (["--calib-images", "4"], True)])
def test_cli_calibration_flags_switch_the_measurement_on(tmp_path, monkeypatch, args, expected):
    """The request the command builds (the exporter is replaced by one that records it and stops)."""
    from typer.testing import CliRunner

    import nextvit_deploy.export as export_mod
    from nextvit_deploy.cli import app
    from nextvit_deploy.errors import BadInput

    seen = []

    def record(req, progress=None):
        seen.append(req)
        raise BadInput("stopped by the test")

    monkeypatch.setattr(export_mod, "export", record)
    result = CliRunner().invoke(app, ["export", "--target", "coreml", "--precision", "fp16", "-o", str(tmp_path),
                                      "--image-size", "64", *args])
    assert result.exit_code == 2 and "stopped by the test" in result.stderr
    assert seen[0].calibrate_fp16 is expected and seen[0].calib_dir is None


def test_calibrate_fp16_is_refused_off_coreml_fp16(tmp_path):
    from nextvit_deploy.errors import BadInput
    from nextvit_deploy.export import ExportRequest, validate_request

    with pytest.raises(BadInput, match="calibrate_fp16 applies only to --target coreml --precision fp16"):
        validate_request(ExportRequest(target="onnx", precision="fp16", out_dir=tmp_path, image_size=(64, 64),
                                       calibrate_fp16=True))
