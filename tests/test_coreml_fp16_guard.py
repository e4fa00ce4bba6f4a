"""The Core ML FP16 overflow guard (export/coreml_fp16.py) on a Next-ViT built to overflow fp16.

The model: the small test Next-ViT (depths (1, 1, 5, 1)) with the q and k projections of its last
E-MHSA scaled up, so that ``q @ k^T`` (formed before the 1/sqrt(d) scale) exceeds fp16's 65504 on
real photos while everything else is unchanged (the softmax absorbs the scale). Exported at 64x64:

* fp16 without calibration (static rules only): the evaluator's fp16 program produces inf/NaN and
  ``verify`` fails;
* fp16 with calibration (bundled calibration photos, which ``verify`` never uses): that attention's
  matmul stays fp32, named in the keep-list, and ``verify`` passes.
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


def test_unguarded_fp16_package_overflows(out_dir, overflow_checkpoint):
    from nextvit_deploy.verify import verify

    art = _export(out_dir / "static", overflow_checkpoint)
    pt = art.details["precision_transform"]
    assert pt["ranges_measured"] is False and "no activation ranges measured" in pt["ranges"]["note"]
    assert not any(k["op_type"] == "matmul" for k in pt["fp32_kept"])
    assert pt["policy"]["activation_max"] == pytest.approx(65504 / 4)
    assert not np.isfinite(_program_output(art)).all()
    assert not verify(art.path)


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
    assert pt["fp16_ops"] > 10 * pt["fp32_ops"] > 0
    assert sum(o["dtype"] == "fp32" for o in ops.values()) == pt["fp32_ops"] == pt["kept_ops_in_package"]
    assert any(m.startswith("fp32 kept: ") and "matmul" in m for m in messages)
    assert np.isfinite(_program_output(art)).all()
    report = verify(art.path)
    assert report, report.to_dict()["worst"]
