"""TensorRT target: without TensorRT the TensorRT-ready ONNX + trtexec command; engine checks in pure Python;
builder/runner tests where TensorRT is installed."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from nextvit_deploy.artifact import Artifact
from nextvit_deploy.backends.onnxrt import OrtRunner
from nextvit_deploy.backends.tensorrt import (
    EngineMismatch,
    check_engine_environment,
    read_sidecar,
    runner_for_artifact,
    sidecar_path,
)
from nextvit_deploy.backends.trt_build import trtexec_command
from nextvit_deploy.errors import ArtifactError, DeployError, EngineNotBuilt, MissingDependency
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.targets import runner_for

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
requires_trt = pytest.mark.skipif(not HAVE_TRT, reason="tensorrt is not installed")
SMALL = dict(depths=(1, 1, 5, 1), image_size=(64, 64))
SIDECAR = {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
           "precision": "fp16", "batch_profile": {"min": 1, "opt": 8, "max": 8}, "onnx_sha256": "ab" * 32,
           "rebuild": "trtexec --onnx=m.onnx --saveEngine=m.engine --stronglyTyped"}


@pytest.mark.skipif(HAVE_TRT, reason="tests the behaviour without TensorRT")
def test_export_trt_without_tensorrt_writes_onnx_and_trtexec(tmp_path):
    req = ExportRequest(target="trt", precision="fp32", batch=(1, 2, 4), out_dir=tmp_path, **SMALL)
    with pytest.raises(EngineNotBuilt) as info:
        export(req)
    exc = info.value
    assert isinstance(exc, MissingDependency)
    msg = str(exc)
    assert "\n" not in msg and "TensorRT is not installed" in msg and "pip install" in msg
    art = Artifact.load(exc.artifact.path)  # manifest written and matching the file
    assert art.path.suffix == ".onnx" and art.target == "trt" and art.details["engine"] is None
    assert not list(tmp_path.glob("*.engine"))  # never claim an engine
    assert exc.trtexec == art.details["trtexec"]
    assert f"--onnx={art.path}" in exc.trtexec and "--minShapes=input:1x3x64x64" in exc.trtexec
    assert "--maxShapes=input:4x3x64x64" in exc.trtexec and "--noTF32" in exc.trtexec
    assert art.details["trt_compat"]["passed"]
    assert isinstance(runner_for(art), OrtRunner)  # verify runs it on ONNX Runtime here
    with pytest.raises(DeployError, match="not an engine"):
        runner_for_artifact(art)  # the TensorRT runner factory takes engines only


def test_trtexec_command_flags():
    cmd = trtexec_command("m.onnx", "m.engine", precision="int8", batch=(8, 8, 8), image_size=(224, 224),
                          workspace_gb=2, timing_cache="t.cache", builder_opt_level=5, dynamic_batch=False)
    assert "--stronglyTyped" in cmd and "--minShapes" not in cmd
    assert "--memPoolSize=workspace:2048M" in cmd and "--timingCacheFile=t.cache" in cmd
    assert "--builderOptimizationLevel=5" in cmd


def test_engine_environment_match_and_mismatch():
    same = {k: SIDECAR[k] for k in ("tensorrt_version", "gpu_name", "compute_capability")}
    assert check_engine_environment(SIDECAR, same) == []
    with pytest.raises(EngineMismatch, match=r"TensorRT 10.13.3.9 .* runs TensorRT 11.1.0.*rebuild it here.*trtexec"):
        check_engine_environment(SIDECAR, {**same, "tensorrt_version": "11.1.0"})
    with pytest.raises(EngineMismatch, match="compute capability 9.0 .*compute capability 8.9"):
        check_engine_environment(SIDECAR, {**same, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"})
    notes = check_engine_environment(SIDECAR, {**same, "gpu_name": "NVIDIA H100 PCIe"})
    assert notes and "H100 PCIe" in notes[0]


def test_sidecar_missing_or_malformed(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="no build sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ArtifactError, match="malformed"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps(SIDECAR))
    assert read_sidecar(engine)["compute_capability"] == "9.0"


@requires_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_and_run(tmp_path, precision):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    from nextvit_deploy.verify import verify_artifact

    art = export(ExportRequest(target="trt", precision=precision, batch=(1, 2, 4), out_dir=tmp_path,
                               calib_images=4, **SMALL))
    assert art.path.suffix == ".engine" and sidecar_path(art.path).is_file()
    side = read_sidecar(art.path)
    assert side["precision"] == precision and side["batch_profile"] == {"min": 1, "opt": 2, "max": 4}
    report = verify_artifact(Artifact.load(art.path))
    assert report, report.to_dict()["worst"]
    runner = runner_for_artifact(art)
    with runner:
        out = runner.infer({"input": np.zeros((3, 3, 64, 64), np.float32)})
        assert out["logits"].shape == (3, 1000) and runner.last_gpu_ms > 0
