"""verify: the reference is rebuilt from the manifest alone; parity failures are reports, not exceptions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nextvit_deploy.artifact import Artifact, manifest_path, sha256_path
from nextvit_deploy.errors import ArtifactError, CheckpointMismatch
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.parity import TOLERANCES, Tolerance, compare_outputs
from nextvit_deploy.verify import candidate_input, parity_cases, verify

from conftest import SMALL_DEPTHS


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Artifact:
    return export(ExportRequest(batch=(1, 3, 3), out_dir=tmp_path_factory.mktemp("v"), depths=SMALL_DEPTHS, seed=9))


def test_verify_passes_at_batch_1_and_max(small_onnx):
    report = verify(small_onnx.path)
    assert report.passed and bool(report)
    assert [c.case for c in report.cases] == ["photos x1", "noise x1", "photos x3", "noise x3"]
    for case in report.cases:
        (out,) = case.outputs
        assert out.max_abs <= 1e-4 and out.cosine >= 0.999999 and out.top5_overlap is not None
    d = report.to_dict()
    assert d["passed"] is True and d["worst"]["max_abs"] <= 1e-4
    json.dumps(d)  # serialisable for CI


def test_wrong_reference_fails_with_the_tolerance_that_would_pass(small_onnx, tmp_path):
    # Same file, manifest claiming another seed: the reference differs, so parity must fail.
    copy = tmp_path / small_onnx.path.name
    copy.write_bytes(small_onnx.path.read_bytes())
    m = json.loads(manifest_path(small_onnx.path).read_text())
    m["seed"] = 10
    manifest_path(copy).write_text(json.dumps(m))
    report = verify(copy, max_batch=1)
    assert not report
    assert report.worst()["required_atol"] > TOLERANCES["fp32"].atol


def test_artifact_without_manifest_is_refused(small_onnx, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(small_onnx.path.read_bytes())
    with pytest.raises(ArtifactError, match="has no manifest"):
        verify(lone)


def test_modified_artifact_is_refused(small_onnx, tmp_path):
    copy = tmp_path / small_onnx.path.name
    copy.write_bytes(small_onnx.path.read_bytes() + b"\0")
    manifest_path(copy).write_text(manifest_path(small_onnx.path).read_text())
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        verify(copy)


def test_changed_checkpoint_is_refused(tmp_path, small_onnx):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"original")
    art = small_onnx.replace(path=tmp_path / small_onnx.path.name, checkpoint=str(ckpt),
                             checkpoint_sha256=sha256_path(ckpt), seed=None)
    art.path.write_bytes(small_onnx.path.read_bytes())
    art.save_manifest()
    ckpt.write_bytes(b"changed")
    with pytest.raises(CheckpointMismatch, match="changed since"):
        verify(art.path)


def test_parity_cases_and_image_input(small_onnx):
    cases = parity_cases(small_onnx)
    assert [c[1].shape[0] for c in cases] == [1, 1, 3, 3]
    assert all(0.0 <= c[1].min() and c[1].max() <= 1.0 for c in cases)
    img = small_onnx.replace(preprocessing={**small_onnx.preprocessing, "input_kind": "image"})
    x = cases[0][1]
    assert np.allclose(candidate_input(x, img), x * 255)
    assert abs(float(candidate_input(x, small_onnx).mean())) < 3


def test_compare_outputs_gates_on_cosine_and_max_abs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 10)).astype(np.float32)
    tol = Tolerance(atol=1e-3, rtol=0.0, min_cosine=0.9999)
    assert compare_outputs({"y": ref}, {"y": ref + 1e-4}, tolerance=tol, case="c").passed
    too_far = compare_outputs({"y": ref}, {"y": ref + 2e-3}, tolerance=tol, case="c")
    assert not too_far.passed and abs(too_far.outputs[0].required_atol - 2e-3) < 1e-6
    flipped = compare_outputs({"y": ref}, {"y": -ref}, tolerance=Tolerance(10.0, 0.0, 0.9), case="c")
    assert not flipped.passed and flipped.outputs[0].cosine < 0
    nan = compare_outputs({"y": ref}, {"y": ref * np.nan}, tolerance=tol, case="c")
    assert not nan.passed


def test_smallest_passing_tolerance_names_the_cosine_when_cosine_failed():
    """Issue #9: an INT8 report that failed on cosine printed "smallest atol that would pass: 0.000e+00"."""
    from nextvit_deploy.parity import TOLERANCES, ParityReport
    from nextvit_deploy.report import parity_summary

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 1000)).astype(np.float32)
    cand = ref + 0.35 * rng.standard_normal(ref.shape).astype(np.float32)  # cosine ~0.94, max abs << 50 % of ref
    case = compare_outputs({"logits": ref}, {"logits": cand}, tolerance=TOLERANCES["int8"], case="photos x4")
    assert not case.passed and case.outputs[0].failed_gates == ("cosine",)
    report = ParityReport(artifact="m.onnx", target="trt", precision="int8", reference="ref", candidate="cand",
                          candidate_device="cpu", tolerance=TOLERANCES["int8"], cases=[case])
    worst = report.worst()
    assert worst["failed_gates"] == ["cosine"] and worst["required_min_cosine"] == pytest.approx(case.outputs[0].cosine)
    line = parity_summary(report)
    assert line.startswith("FAIL") and "failed on cosine" in line
    assert f"cosine >= {case.outputs[0].cosine:.7f}" in line and "(gate: cosine >= 0.98)" in line


def test_default_calibration_images_are_disjoint_from_verify_photos():
    """INT8 parity is never measured on the images it was calibrated on."""
    from nextvit_deploy.data import CALIBRATION_SOURCES, CALIBRATION_VIEWS, SKIMAGE_PHOTOS, calibration_photos, photos
    from nextvit_deploy.export.precision import calibration_set

    assert not {s.split(":")[1] for s in CALIBRATION_SOURCES if s.startswith("skimage")} & set(SKIMAGE_PHOTOS + ("cat",))
    cal = calibration_photos(len(CALIBRATION_SOURCES) * len(CALIBRATION_VIEWS), 32)
    ver = photos(len(SKIMAGE_PHOTOS), 32)
    assert len({c.tobytes() for c in cal}) == cal.shape[0]  # 64 distinct images
    dist = ((cal[:, None] - ver[None]) ** 2).mean(axis=(2, 3, 4))
    assert dist.min() > 1e-3  # no calibration image is (close to) a verify photo
    cs = calibration_set(image_size=(32, 32), calib_dir=None, calib_images=500, crop_pct=0.95, mean=(0.5,) * 3,
                         std=(0.5,) * 3)
    assert cs.feeds.shape[0] == 64 and "verify does not use" in cs.source


def test_verify_inputs_folder_is_an_extra_gated_case(small_onnx, tmp_path):
    from PIL import Image

    from nextvit_deploy.errors import BadInput

    rng = np.random.default_rng(3)
    for i in range(4):  # 4 images at max batch 3: a full case and a padded one
        Image.fromarray(rng.integers(0, 256, (200 + 10 * i, 300, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    report = verify(small_onnx.path, inputs=tmp_path)
    inputs = [c for c in report.cases if c.case.startswith("inputs")]
    assert [c.case for c in inputs] == ["inputs #1 x3", "inputs #2 x1"]
    assert all(c.gated for c in inputs) and report.passed
    assert any("4 images used" in n and "1 skipped (bad.jpg" in n for n in report.notes)
    assert "inputs" in TOLERANCES["int8"].gated_cases
    with pytest.raises(BadInput, match="--inputs folder .* does not exist: pass a folder of .jpg/.png images with --inputs"):
        verify(small_onnx.path, inputs=tmp_path / "nope")
