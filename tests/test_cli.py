"""The command line: the README's flow works, and every bad input exits 2 with one line, writing nothing."""
from __future__ import annotations

import json

import pytest
import torch
from cli_checks import assert_user_error
from typer.testing import CliRunner

from nextvit_deploy.cli import app

from conftest import PicklePayload

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("export", "verify", "doctor"):
        assert cmd in result.stdout


def test_doctor_reports_backends():
    result = run("doctor")
    assert result.exit_code == 0
    assert "onnxruntime" in result.stdout and "tensorrt" in result.stdout and "coremltools" in result.stdout


@pytest.mark.parametrize("args,pattern", [
    (["--variant", "nextvit_tiny"], r"unknown variant 'nextvit_tiny'.*choose one of"),
    (["--image-size", "16"], r"image size 16x16 is too small.*use at least 25x25"),
    (["--image-size", "big"], r"--image-size 'big' is not a size: use 224 or HEIGHTxWIDTH"),
    (["--batch", "0"], r"--batch must be at least 1"),
    (["--batch", "8:2"], r"need min <= opt <= max"),
    (["--target", "coreml", "--palettize-bits", "5"], r"--palettize-bits must be one of 4, 6, 8, got 5"),
    (["--checkpoint", "/nonexistent/weights.pth"], r"checkpoint /nonexistent/weights.pth does not exist"),
    (["--input-kind", "jpeg"], r"--input-kind must be 'tensor' or 'image'"),
    (["--precision", "int8", "--calib-images", "0"], r"--calib-images must be at least 1, got 0"),
])
def test_export_bad_arguments(tmp_path, args, pattern):
    out = tmp_path / "out"
    assert_user_error(run("export", "--out", str(out), *args), pattern, out)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert_user_error(run("export", "--out", str(blocker / "sub")), r"output directory .* cannot be created")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage" * 100)
    out = tmp_path / "out"
    assert_user_error(run("export", "--checkpoint", str(bad), "--out", str(out)), r"is corrupt or not a PyTorch file", out)


def test_unknown_layout_checkpoint(tmp_path):
    ckpt = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, ckpt)
    out = tmp_path / "out"
    assert_user_error(run("export", "--checkpoint", str(ckpt), "--out", str(out)), r"unknown layout", out)


def test_checkpoint_of_another_variant(tmp_path, s_checkpoint):
    out = tmp_path / "out"
    assert_user_error(run("export", "--variant", "b", "--checkpoint", str(s_checkpoint), "--out", str(out)),
                      r"is a nextvit_small checkpoint but nextvit_base was requested: pass --variant small", out)


def test_checkpoint_with_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": PicklePayload(marker)}, ckpt)
    out = tmp_path / "out"
    assert_user_error(run("export", "--checkpoint", str(ckpt), "--out", str(out)), r"was refused", out)
    assert not marker.exists()


def test_verify_without_manifest(tmp_path):
    lone = tmp_path / "model.onnx"
    lone.write_bytes(b"\x08\x07")
    assert_user_error(run("verify", str(lone)), r"has no manifest .* export it with nextvit-deploy export")


def test_verify_missing_artifact(tmp_path):
    assert_user_error(run("verify", str(tmp_path / "none.onnx")), r"does not exist")


def test_verify_exit_code_1_on_parity_failure(tmp_path):
    from nextvit_deploy.export import ExportRequest, export

    art = export(ExportRequest(target="onnx", depths=(1, 1, 5, 1), image_size=(64, 64), batch=(1, 1, 1), seed=1,
                               out_dir=tmp_path / "b"))  # a small model: only the exit code is under test
    onnx_path = art.path
    manifest = onnx_path.with_name(onnx_path.name + ".manifest.json")
    m = json.loads(manifest.read_text())
    m["seed"] = 2  # the reference now differs from what was exported
    manifest.write_text(json.dumps(m))
    result = run("verify", str(onnx_path))
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "smallest tolerance that would pass" in result.stdout


@pytest.mark.parametrize("args, pattern", [
    (["--calib-method", "kl"], r"--calib-method 'kl' is unknown: choose max, percentile, entropy"),
    (["--int8-float", "bf16"], r"--int8-float 'bf16' is unknown: choose fp16 or fp32"),
    (["--device", "gpu0"], r"device 'gpu0' is not a CUDA device: use cuda or cuda:N"),
])
def test_trt_int8_options_are_validated_before_any_work(tmp_path, args, pattern):
    out = tmp_path / "out"
    result = run("export", "--target", "trt", "--precision", "int8", "--out", str(out), *args)
    assert_user_error(result, pattern, out)


def test_verify_engine_without_tensorrt_names_the_install(tmp_path):
    """An engine built with the printed trtexec command (no manifest of its own) is matched to its ONNX manifest;
    without TensorRT the verify command then says how to get it, in one line."""
    from nextvit_deploy.errors import EngineNotBuilt
    from nextvit_deploy.export import ExportRequest, export

    with pytest.raises(EngineNotBuilt) as info:
        export(ExportRequest(target="trt", depths=(1, 1, 5, 1), image_size=(64, 64), out_dir=tmp_path))
    engine = info.value.artifact.path.with_suffix(".engine")
    engine.write_bytes(b"plan bytes from trtexec")
    assert_user_error(run("verify", str(engine)), r"tensorrt is needed .* install with: pip install")
    orphan = tmp_path / "orphan.engine"
    orphan.write_bytes(b"x")
    assert_user_error(run("verify", str(orphan)), r"no TensorRT-ready ONNX manifest beside it names it")
