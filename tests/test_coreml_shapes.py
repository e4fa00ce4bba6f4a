"""Core ML backbones with enumerated input sizes (``export --target coreml --backbone --image-sizes``).

A tiny backbone (depths (1, 1, 5, 1)) is exported once at 64x64 + 96x64 (fp32) and verified through the MIL
evaluator at each size; the package declares exactly those shapes, the evaluator refuses any other, and bad
``--image-sizes`` input is one line and exit 2 with nothing written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import assert_user_error
from typer.testing import CliRunner

from conftest import SMALL_DEPTHS, requires

pytestmark = requires("coremltools")

SIZES = ((64, 64), (96, 64))


@pytest.fixture(scope="module")
def flexible(tmp_path_factory):
    from nextvit_deploy.export import ExportRequest, export

    out = tmp_path_factory.mktemp("coreml-shapes")
    req = ExportRequest(target="coreml", precision="fp32", out_dir=out, depths=SMALL_DEPTHS, seed=2,
                        features_only=True, image_size=SIZES[0], image_sizes=SIZES)
    return export(req)


@pytest.mark.slow  # the module's export: ~10-20 s on 2 shared cores
def test_package_declares_every_size_and_records_them(flexible):
    from nextvit_deploy._deps import import_coremltools
    from nextvit_deploy.artifact import Artifact

    assert flexible.path.name == "nextvit_small-backbone-coreml-fp32-64x64+96x64.mlpackage"
    loaded = Artifact.load(flexible.path)
    assert loaded.details["image_sizes"] == [[64, 64], [96, 64]]
    assert loaded.details["flexible_shapes"] == "EnumeratedShapes"
    assert loaded.details["traced_sizes_frozen"] == 0
    assert loaded.input_shape == (1, 3, 64, 64)  # the default size
    assert set(loaded.details["trace_drift_per_size"]) == {"64x64", "96x64"}
    spec = import_coremltools().models.MLModel(str(flexible.path), skip_model_load=True).get_spec()
    arr = spec.description.input[0].type.multiArrayType
    assert arr.WhichOneof("ShapeFlexibility") == "enumeratedShapes"
    assert [tuple(s.shape) for s in arr.enumeratedShapes.shapes] == [(1, 3, 64, 64), (1, 3, 96, 64)]


@pytest.mark.slow  # the module's export: ~10-20 s on 2 shared cores
def test_verify_checks_every_size(flexible):
    from nextvit_deploy.verify import verify

    report = verify(flexible.path)
    assert "MIL evaluator" in report.candidate_device
    by_size = {s: [c for c in report.cases if c.case.endswith(f"@{s}")] for s in ("64x64", "96x64")}
    assert all(len(cases) == 2 for cases in by_size.values()), [c.case for c in report.cases]  # photos + noise
    assert len(report.cases) == 4 and report.passed, report.cases
    assert any("enumerated input sizes" in n for n in report.notes)


@pytest.mark.slow  # the module's export: ~10-20 s on 2 shared cores
def test_evaluator_runs_each_size_and_refuses_others(flexible):
    """Outputs follow the input size (strides 4..32) and match the eager backbone; 128x64 is not declared."""
    from nextvit_deploy.backends.coreml_mil import MilEvaluator
    from nextvit_deploy.errors import BadInput
    from nextvit_deploy.reference import reference_model

    ev = MilEvaluator.from_package(flexible.path)
    assert ev.input_specs()[0].shape == (1, 3, None, 64)  # only the height varies across the two sizes
    model = reference_model(flexible)
    for h, w in SIZES:
        x = np.random.default_rng(h).standard_normal((1, 3, h, w)).astype(np.float32)
        got = ev.run({"input": x})
        with torch.no_grad():
            want = model(torch.from_numpy(x))
        for i, (name, stride) in enumerate(zip(("feat_s4", "feat_s8", "feat_s16", "feat_s32"), (4, 8, 16, 32))):
            assert got[name].shape[2:] == (h // stride, w // stride)
            ref = want[i].numpy()
            assert np.abs(got[name] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    with pytest.raises(BadInput, match=r"takes only 1x3x64x64, 1x3x96x64.*--image-sizes"):
        ev.run({"input": np.zeros((1, 3, 128, 64), np.float32)})


@pytest.mark.slow
def test_fp16_image_input_verifies_at_each_size(tmp_path):
    """An image input declares enumerated *sizes* (not shapes); the fp16 program passes fp16's gate at each."""
    from nextvit_deploy.backends.coreml_mil import enumerated_input_shapes
    from nextvit_deploy.export import ExportRequest, export
    from nextvit_deploy.verify import verify

    sizes = ((64, 96), (96, 64), (64, 64))
    art = export(ExportRequest(target="coreml", precision="fp16", out_dir=tmp_path, depths=SMALL_DEPTHS, seed=3,
                               features_only=True, input_kind="image", image_size=sizes[0], image_sizes=sizes))
    assert enumerated_input_shapes(art.path) == {"input": [(1, 3, h, w) for h, w in sizes]}
    report = verify(art.path)
    assert len(report.cases) == 6 and report.passed, report.cases
    assert {c.case.split("@")[1] for c in report.cases} == {"64x96", "96x64", "64x64"}


def test_trace_check_catches_a_baked_size():
    """A model whose trace records its size as a constant is refused before conversion."""
    from nextvit_deploy.errors import DeployError
    from nextvit_deploy.export.coreml_shapes import check_trace_sizes

    class Baked(torch.nn.Module):
        def forward(self, x):
            return x * float(int(x.shape[2]))  # the trace keeps 64 as a constant

    model = Baked()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), check_trace=False)
    assert check_trace_sizes(model, traced, [(64, 64)], batch=1, image_input=False)["64x64"] < 1e-6
    with pytest.raises(DeployError, match="differs from the model by .* at 96x64"):
        check_trace_sizes(model, traced, [(64, 64), (96, 64)], batch=1, image_input=False)

    class Reshaped(torch.nn.Module):
        def forward(self, x):
            return x.reshape(1, 3, int(x.shape[2]) * int(x.shape[3])).mean(-1)

    with torch.no_grad():
        traced = torch.jit.trace(Reshaped(), torch.randn(1, 3, 64, 64), check_trace=False)
    with pytest.raises(DeployError, match="does not run at 96x64"):
        check_trace_sizes(Reshaped(), traced, [(64, 64), (96, 64)], batch=1, image_input=False)


def test_parse_image_sizes():
    from nextvit_deploy.errors import BadInput
    from nextvit_deploy.export.coreml_shapes import parse_image_sizes

    assert parse_image_sizes("512x512, 640x640,800x1216") == ((512, 512), (640, 640), (800, 1216))
    assert parse_image_sizes("512,640") == ((512, 512), (640, 640))
    for text, pattern in (("512x512", "lists one size"), ("512x512,abc", "'abc' is not a size"),
                          ("512x512,512", "repeats 512x512"), (",".join(["64"] * 2 + ["96"]), "repeats"),
                          (",".join(f"{32 * i}" for i in range(1, 10)), "more than the limit of 8")):
        with pytest.raises(BadInput, match=pattern):
            parse_image_sizes(text)


# --------------------------------------------------------------------------------------------------
# The command line: bad input is one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------
def _cli(*args: str):
    from nextvit_deploy.cli import app

    return CliRunner().invoke(app, ["export", *args], catch_exceptions=False)


@pytest.mark.parametrize("args, pattern", [
    (["--target", "coreml", "--backbone", "--image-sizes", "64x64,100x64"], r"100x64 is not a multiple of 32.*96x64"),
    (["--target", "coreml", "--backbone", "--image-sizes", ",".join(f"{32 * i}" for i in range(2, 11))],
     "more than the limit of 8"),
    (["--target", "coreml", "--image-sizes", "64x64,96x64"], "--image-sizes needs --backbone"),
    (["--target", "onnx", "--backbone", "--image-sizes", "64x64,96x64"],
     "--image-sizes applies only to --target coreml, not onnx"),
    (["--target", "coreml", "--backbone", "--image-size", "64", "--image-sizes", "64x64,96x64"], "drop --image-size"),
    (["--target", "coreml", "--backbone", "--image-sizes", "64x64"], "lists one size"),
    (["--target", "coreml", "--backbone", "--image-sizes", "4096x64,64x64"], "above the limit of 2048"),
])
def test_bad_image_sizes_is_one_line_exit_2(tmp_path: Path, args, pattern):
    out = tmp_path / "out"
    assert_user_error(_cli(*args, "--out", str(out)), pattern, out)
